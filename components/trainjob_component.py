"""The train step when params.yaml says ``launch.launcher: trainjob``: it launches a Kubeflow Trainer v2 TrainJob and
waits for it (``finetune.trainjob.train_on_cluster``). Same verb, inputs and outputs as the single-pod ``train`` in
finetune_components.py, so evaluate and register are wired the same way. No stage logic here."""

from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Model, Output

IMAGE = (Path(__file__).with_name("image.txt")).read_text().strip()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], params: dict, base_model: str, epochs: float, max_steps: int, batch_size: int,
          learning_rate: float, checkpoint_dir: str, cluster: dict, image: str, run_id: str, model: Output[Model],
          train_logs: Output[Artifact]):
    """Checkpoints live on the shared volume per run (``checkpoint_dir`` is not used here)."""
    from finetune.stages import config_for
    from finetune.trainjob import TrainJobSettings, train_on_cluster

    cfg = config_for(params, {"model.base": base_model, "train.epochs": epochs, "train.max_steps": max_steps or None,
                              "train.batch_size": batch_size, "train.learning_rate": learning_rate})
    train_on_cluster(cfg, TrainJobSettings.from_cluster(cluster), image, run_id, tokens.path, model.path,
                     train_logs.path)


def on_trainjob(params: dict[str, Any]) -> bool:
    return (params.get("launch") or {}).get("launcher") == "trainjob"


def launch_args(cluster: dict[str, Any]) -> dict[str, Any]:
    """The TrainJob step's extra arguments: cluster settings, the image its nodes run, the run it belongs to."""
    return {"cluster": cluster, "image": IMAGE, "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}


def mount_shared_volume(task, cluster: dict[str, Any]) -> None:
    """The step only launches and waits (no GPU); it shares the tokens and the model with the nodes here."""
    volume = cluster["trainjob"]["shared_volume"]
    kubernetes.mount_pvc(task, pvc_name=volume["claim"], mount_path=volume["mount"])
