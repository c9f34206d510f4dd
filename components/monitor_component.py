"""The KFP component of `finetune monitor`: maps its parameters onto ``finetune.stages.monitor.run_monitor``
(the same function the CLI calls) and tells the loop whether to retrain. No monitoring logic here."""

from pathlib import Path
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

IMAGE = (Path(__file__).with_name("image.txt")).read_text().strip()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def monitor(data_uri: str, model_uri: str, params: dict, force_retrain: bool, report: Output[Artifact]
            ) -> NamedTuple("MonitorOutputs", drift=bool, labelled=bool, retrain=bool):
    """Needs MLFLOW_TRACKING_URI. ``retrain``: drift was found and the batch is labelled (it can be trained on),
    or ``force_retrain`` says to retrain on it anyway."""
    from finetune.common import tracking
    from finetune.common.params import config_from_dict
    import tempfile

    from finetune.common.sources import fetch
    from finetune.stages.monitor import run_monitor

    with tempfile.TemporaryDirectory() as tmp:
        local = fetch(data_uri, tmp)
        result = run_monitor(config_from_dict(params), model_uri or None, local, report.path,
                             tracking.configure(require_env=True)[0])
    return (result["drift"], result["labelled"], bool(force_retrain or (result["drift"] and result["labelled"])))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def no_retrain(drift: bool, labelled: bool):
    """The loop's other branch: says why nothing is retrained (the monitor's report artifact has the details)."""
    print("no drift: nothing to retrain" if not drift else "drift, but the batch has no labels to train on: "
          "label it, or run again with force_retrain=true")
