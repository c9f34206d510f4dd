"""Where the train step runs on a cluster (params.yaml ``launch:``), a section of the one config (config.Config.launch)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from finetune.common.coercion import rule


@dataclass
class LaunchConfig:
    SECTION: typing.ClassVar[str] = "launch"
    launcher: str = field(default="local", metadata={"help": "local: train in the step's own pod (or process); "
                                                             "trainjob: a Kubeflow Trainer v2 TrainJob (cluster)"})
    nodes: int = field(default=1, metadata={"help": "TrainJob nodes (pods); > 1 needs launcher: trainjob"})
    procs_per_node: int = field(default=0, metadata={"help": "torchrun processes per node; 0 = one per GPU"})

    def __post_init__(self) -> None:
        rule(self, "launcher", self.launcher in ("local", "trainjob"), "local or trainjob")
        rule(self, "nodes", self.nodes >= 1, ">= 1")
        rule(self, "procs_per_node", self.procs_per_node >= 0, ">= 0 (0 = one per GPU)")
        rule(self, "nodes", self.nodes == 1 or self.launcher == "trainjob", "1 unless launch.launcher is trainjob")
