"""The train step when params.yaml says ``launch.launcher: trainjob``: it launches a Kubeflow Trainer v2 TrainJob and
waits for it (``finetune.cluster.trainjob.train_on_cluster``). Same verb, inputs and outputs as the single-pod ``train`` in
finetune_components.py, so evaluate and register are wired the same way. No stage logic here."""

from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.finetune_components import IMAGE  # one image for every step


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], params: dict, checkpoint_dir: str, cluster: dict, image: str, run_id: str,
          model: Output[Model], train_logs: Output[Artifact]):
    """Checkpoints live on the shared volume per run (``checkpoint_dir`` is not used here)."""
    from finetune.common.params import config_from_dict
    from finetune.cluster.trainjob import TrainJobSettings, train_on_cluster

    train_on_cluster(config_from_dict(params), TrainJobSettings.from_cluster(cluster), image, run_id, tokens.path, model.path,
                     train_logs.path)


def launch_args(cluster: dict[str, Any]) -> dict[str, Any]:
    """The TrainJob step's extra arguments: cluster settings, the image its nodes run, the run it belongs to."""
    return {"cluster": cluster, "image": IMAGE, "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}


def mount_shared_volume(task, cluster: dict[str, Any]) -> None:
    """The step only launches and waits (no GPU); it shares the tokens and the model with the nodes here."""
    volume = cluster["trainjob"]["shared_volume"]
    kubernetes.mount_pvc(task, pvc_name=volume["claim"], mount_path=volume["mount"])
