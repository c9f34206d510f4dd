"""Run the compiled pipeline's steps inside the image, as the cluster would: for each task, the container
command and args that pipelines/finetune_pipeline.yaml gives its executor, with `{{$}}` replaced by an
ExecutorInput built with kfp's own helpers (what the KFP launcher hands the container), artifacts on local paths
under /tmp/pipeline (a host folder bound into the sandbox), outputs read back from the executor output file.
The DAG's order and wiring are those of the spec's `comp-condition-2` branch after validate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from kfp.local import executor_input_utils, executor_output_utils, placeholder_utils
from kfp.pipeline_spec import pipeline_spec_pb2

from components.image import sandbox

SPEC = Path(__file__).resolve().parents[2] / "pipelines" / "finetune_pipeline.yaml"
INSIDE = "/tmp/pipeline"  # where the host work folder appears in the sandbox


class StepFailed(RuntimeError):
    pass


def load_spec(path: Path = SPEC) -> pipeline_spec_pb2.PipelineSpec:
    first = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    return json_format.ParseDict(first, pipeline_spec_pb2.PipelineSpec())


def pipeline_defaults(spec: pipeline_spec_pb2.PipelineSpec) -> dict[str, Any]:
    params = spec.root.input_definitions.parameters
    return {k: executor_output_utils.pb2_value_to_python(v.default_value) for k, v in params.items()}


@dataclass
class Run:
    """One pipeline run's state: the host work folder and every task's outputs so far."""

    work: Path
    image: dict
    env: dict[str, str] = field(default_factory=dict)
    netns: str | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    def step(self, spec: pipeline_spec_pb2.PipelineSpec, task: str, arguments: dict[str, Any],
             env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``task``'s executor in the image with ``arguments`` (parameters by value; input artifacts as
        "task.output" references to earlier steps)."""
        component = spec.components[f"comp-{task}"]
        container = spec.deployment_spec.fields["executors"].struct_value.fields[component.executor_label]
        container = json_format.MessageToDict(container)["container"]
        resolved = {k: self._artifact(v) if isinstance(v, str) and v.startswith("@") else v
                    for k, v in arguments.items()}
        task_root = f"{INSIDE}/{task}"
        (self.work / task).mkdir(parents=True, exist_ok=True)
        os.chown(self.work / task, *_ids(self.image))
        executor_input = executor_input_utils.construct_executor_input(component, resolved, task_root, False)
        command = placeholder_utils.replace_placeholders(
            [*container["command"], *container["args"]], json_format.MessageToDict(executor_input),
            pipeline_resource_name="finetune-image-run", task_resource_name=task, pipeline_root=INSIDE,
            unique_pipeline_id="image-run")
        proc = sandbox.run(Path(self.image["rootfs"]), self.image["config"], command, {**self.env, **(env or {})},
                           {str(self.work): INSIDE}, self.netns)
        self.logs[task] = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise StepFailed(f"step {task} exited {proc.returncode}:\n{self.logs[task][-4000:]}")
        output = executor_output_utils.load_executor_output(str(self.work / task / "executor_output.json"))
        outputs = executor_output_utils.get_outputs_from_executor_output(output, executor_input, component)
        for key in component.output_definitions.artifacts:  # no executor output file: artifacts as declared
            outputs.setdefault(key, executor_output_utils.artifact_list_to_dsl_artifact(
                executor_input.outputs.artifacts[key], is_artifact_list=False))
        self.outputs[task] = outputs
        return outputs

    def host_path(self, artifact) -> Path:
        """Where an artifact the sandbox wrote lies on the host."""
        return self.work / Path(artifact.path).relative_to(INSIDE)

    def _artifact(self, ref: str):
        task, _, key = ref[1:].partition(".")
        return self.outputs[task][key]


def _ids(image: dict) -> tuple[int, int]:
    uid, _, gid = image["config"]["User"].partition(":")
    return int(uid), int(gid or uid)


def run_pipeline(image: dict, work: Path, values: dict[str, Any], overrides: list[str] | None = None,
                 env: dict[str, str] | None = None, netns: str | None = None, spec_path: Path = SPEC) -> Run:
    """validate -> tokenize -> train -> evaluate -> distill -> compress -> register in the image, with the pipeline's
    parameter defaults from the spec: per-run ``values`` (``data_uri`` as seen inside the sandbox, under
    /tmp/pipeline) and ``overrides`` (``section.key=value``, as `finetune pipeline submit --set` applies them to
    the ``params`` struct)."""
    from finetune.common.params import apply_overrides, as_params, config_from_dict

    spec = load_spec(spec_path)
    p = {**pipeline_defaults(spec), **values}
    params = as_params(config_from_dict(apply_overrides(p["params"], overrides)))
    work.mkdir(parents=True, exist_ok=True)
    os.chown(work, *_ids(image))
    run = Run(work, image, netns=netns)
    # ``env`` goes where pipelines/cluster.yaml puts the secrets: validate (S3) and register (S3 + MLflow)
    out = run.step(spec, "validate", {"data_uri": p["data_uri"], "data_md5": p["data_md5"], "params": params}, env)
    if not out["passed"]:
        raise StepFailed(f"validate refused the data: {out['summary']}")
    run.step(spec, "tokenize", {"splits": "@validate.splits", "params": params})
    run.step(spec, "train", {"tokens": "@tokenize.tokens", "params": params, "checkpoint_dir": p["checkpoint_dir"]})
    run.step(spec, "evaluate", {"model": "@train.model", "tokens": "@tokenize.tokens", "params": params})
    run.step(spec, "distill", {"model": "@train.model", "tokens": "@tokenize.tokens", "params": params})
    run.step(spec, "compress", {"model": "@train.model", "tokens": "@tokenize.tokens", "params": params,
                                "student": "@distill.student"})
    run.step(spec, "register", {
        "model": "@train.model", "evaluation": "@evaluate.evaluation", "splits": "@validate.splits",
        "train_logs": "@train.train_logs", "tokens": "@tokenize.tokens", "compressed": "@compress.compressed",
        "params": params, "data_uri": p["data_uri"], "data_md5": p["data_md5"], "git_rev": p["git_rev"],
        "run_name": "image-run"}, env)
    return run
