"""The TrainJob launcher (src/finetune/trainjob.py): the object it creates validates against the Kubeflow Trainer
v2.3.0 CRD schema and carries the cluster settings; create / follow / fail / time out / adopt against a fake
Kubernetes API; and the TrainJob's own command line, run as the Trainer runs it (PET_* variables, 2 CPU
processes), trains the model that the pipeline step hands on."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
from types import SimpleNamespace

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiException

from conftest import BIN, REPO, free_port, toy_frame
from finetune.cluster.trainjob import (
    JOBSET_LABEL,
    QUEUE_LABEL,
    TRAINER_VERSION,
    TrainJobFailed,
    TrainJobSettings,
    build_trainjob,
    job_name,
    run_trainjob,
    train_on_cluster,
)
from finetune.common.coercion import ConfigError
from finetune.common.config import LaunchConfig
from finetune.common.params import config_from_dict, load_config

CLUSTER = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())
IMAGE = (REPO / "components" / "image.txt").read_text().strip()
SCHEMA = json.loads((REPO / "k8s" / "schemas" / "trainjob-v1alpha1.json").read_text())


def settings(**changes) -> TrainJobSettings:
    return dataclasses.replace(TrainJobSettings.from_cluster(CLUSTER), **changes)


def job(nodes: int = 2, **changes) -> dict:
    return build_trainjob(job_name("run-1"), LaunchConfig(launcher="trainjob", nodes=nodes), settings(**changes), IMAGE)


# ---- the object ----

def test_trainjob_validates_against_the_crd_schema_and_carries_the_cluster_settings():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert f"kubeflow/trainer {TRAINER_VERSION} " in SCHEMA["description"]  # the schema of the pinned release
    tj = job(nodes=3)
    jsonschema.Draft202012Validator(SCHEMA).validate(tj)
    gpu, res = CLUSTER["gpu"], CLUSTER["resources"]
    trainer = tj["spec"]["trainer"]
    assert trainer["image"] == IMAGE and trainer["numNodes"] == 3 and trainer["numProcPerNode"] == gpu["count"]
    assert trainer["command"][:4] == ["torchrun", "--no-python", "finetune", "train"]
    per_node = {"cpu": res["train_cpu"], "memory": res["train_memory"], gpu["accelerator"]: str(gpu["count"])}
    assert trainer["resourcesPerNode"] == {"requests": per_node, "limits": per_node}
    assert tj["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": CLUSTER["trainjob"]["runtime_kind"],
                                        "name": CLUSTER["trainjob"]["runtime"]}
    (patch,) = tj["spec"]["runtimePatches"]
    # what Trainer v2.3.0's webhook checks beyond the schema: the manager is a domain-prefixed path, the patched
    # replicated job exists in the runtime, and no env is patched into the node container
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[\w./-]+", patch["manager"])
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]
    assert node["name"] == "node" and "containers" not in pod.get("spec", {})
    assert pod["metadata"]["labels"] == {CLUSTER["pod_label"]["key"]: CLUSTER["pod_label"]["value"]}
    assert pod["spec"]["nodeSelector"] == gpu["node_selector"] and pod["spec"]["tolerations"] == gpu["tolerations"]
    assert tj["metadata"]["namespace"] == CLUSTER["trainjob"]["namespace"]
    assert QUEUE_LABEL not in tj["metadata"]["labels"]  # cluster.yaml names no queue
    assert tj["spec"]["activeDeadlineSeconds"] == CLUSTER["trainjob"]["timeout_seconds"]


def test_kueue_queue_label_and_explicit_processes_per_node():
    tj = build_trainjob("finetune-x", LaunchConfig(launcher="trainjob", nodes=2, procs_per_node=4),
                        settings(queue="gpu-queue", gpus=0), IMAGE)
    jsonschema.Draft202012Validator(SCHEMA).validate(tj)
    assert tj["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue"
    assert tj["spec"]["trainer"]["numProcPerNode"] == 4
    assert "nvidia.com/gpu" not in tj["spec"]["trainer"]["resourcesPerNode"]["limits"]  # a CPU pool


def test_job_name_is_a_stable_dns_label_per_run():
    a, b = job_name("finetune-abc-123"), job_name("finetune-abc-124")
    assert a == job_name("finetune-abc-123") and a != b
    assert len(a) <= 63 and a.replace("-", "").isalnum() and a == a.lower() and a[0].isalpha()


@pytest.mark.parametrize("mutate, message", [
    (lambda j: j["spec"]["trainer"].update(numNode=2), "numNode"),
    (lambda j: j["spec"]["trainer"].update(numNodes="2"), "'2'"),
    (lambda j: j["spec"]["runtimePatches"][0].pop("manager"), "manager"),
    (lambda j: j["spec"].pop("runtimeRef"), "runtimeRef"),
    (lambda j: j.update(apiVersion="kubeflow.org/v1"), "trainer.kubeflow.org/v1alpha1"),
    (lambda j: j["spec"].update(activeDeadlineSeconds=0), "minimum"),
])
def test_schema_rejects_broken_trainjobs(mutate, message):
    tj = job()
    mutate(tj)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.Draft202012Validator(SCHEMA).validate(tj)
    assert message in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["trainjob"].pop("runtime"), "runtime"),
    (lambda c: c["trainjob"].update(runtime_kind="Runtime"), "runtime_kind"),
    (lambda c: c["trainjob"]["shared_volume"].update(mount="shared"), "absolute"),
    (lambda c: c["trainjob"].update(timeout_seconds=0), "timeout_seconds"),
])
def test_bad_cluster_settings_are_refused_by_name(change, message):
    cluster = copy.deepcopy(CLUSTER)
    change(cluster)
    with pytest.raises(ConfigError, match=message):
        TrainJobSettings.from_cluster(cluster)


def test_more_than_one_node_needs_the_trainjob_launcher():
    with pytest.raises(ConfigError, match="launch.nodes = 2: must be 1 unless launch.launcher is trainjob"):
        config_from_dict({"launch": {"nodes": 2}})
    with pytest.raises(ConfigError, match="launch.launcher = 'slurm': must be local or trainjob"):
        config_from_dict({"launch": {"launcher": "slurm"}})
    assert config_from_dict({"launch": {"launcher": "trainjob", "nodes": 4}}).launch.nodes == 4


# ---- create, follow, fail, time out (fake Kubernetes API) ----

def condition(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


class FakeKube:
    """CustomObjectsApi + CoreV1Api for one namespace. ``states`` are the TrainJob statuses successive GETs see
    (the last one repeats); ``logs`` the rank-0 log text each log read returns (the last one repeats)."""

    def __init__(self, states: list[dict], logs: list[str] | None = None, existing: dict | None = None,
                 on_create=None, create_error: ApiException | None = None):
        self.states, self.logs = list(states), list(logs or [""])
        self.objects = {existing["metadata"]["name"]: existing} if existing else {}
        self.pristine = set(self.objects)  # a job that existed before is seen once as it was
        self.created, self.deleted, self.on_create, self.create_error = [], [], on_create, create_error

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if self.create_error:
            raise self.create_error
        if body["metadata"]["name"] in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(copy.deepcopy(body))
        self.objects[body["metadata"]["name"]] = body
        if self.on_create:
            self.on_create(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        if name in self.pristine:
            self.pristine.discard(name)
        else:
            status = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            self.objects[name] = {**self.objects[name], "status": status}
        return self.objects[name]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.deleted.append((name, propagation_policy))
        self.objects.pop(name, None)

    def list_namespaced_pod(self, namespace, label_selector):
        selector = dict(term.split("=") for term in label_selector.split(","))
        assert selector == {JOBSET_LABEL: selector[JOBSET_LABEL], "batch.kubernetes.io/job-completion-index": "0"}
        name = selector[JOBSET_LABEL]
        if name not in self.objects:
            return SimpleNamespace(items=[])
        # rank 0 before and after a restart: the replaced pod failed, the new one runs
        pods = [(f"{name}-node-0-0-old00", "Failed", 1), (f"{name}-node-0-0-aaaaa", "Running", 2)]
        return SimpleNamespace(items=[SimpleNamespace(metadata=SimpleNamespace(name=n, creation_timestamp=t),
                                                      status=SimpleNamespace(phase=phase)) for n, phase, t in pods])

    def read_namespaced_pod_log(self, name, namespace, container):
        assert container == "node" and name.endswith("-node-0-0-aaaaa")  # rank 0's current trainer container
        return self.logs.pop(0) if len(self.logs) > 1 else self.logs[0]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def launch(kube: FakeKube, tj: dict, timeout: float = 100, clock: Clock | None = None) -> tuple[dict, list[str]]:
    lines, clock = [], clock or Clock()
    state = run_trainjob(tj, kube, kube, timeout, 10, emit=lines.append, sleep=clock.sleep, clock=clock)
    return state, lines


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2}]}


def test_follows_the_job_to_completion_streaming_rank0_log_once_per_line():
    kube = FakeKube([{}, RUNNING, RUNNING, {"conditions": [condition("Complete")]}],
                    logs=["", "step 1 loss 0.7", "step 1 loss 0.7\nstep 2 loss 0.5",
                          "step 1 loss 0.7\nstep 2 loss 0.5"])
    tj = job()
    state, lines = launch(kube, tj)
    assert kube.created == [tj] and not kube.deleted
    assert lines.count("step 1 loss 0.7") == 1 and lines.count("step 2 loss 0.5") == 1
    assert lines.index("step 1 loss 0.7") < lines.index("step 2 loss 0.5")
    assert any("2 active, 2 ready" in line for line in lines) and lines[-1].endswith("complete")
    assert state["status"]["conditions"][0]["type"] == "Complete"


def test_a_failed_job_fails_with_its_reason_and_the_last_log_lines():
    kube = FakeKube([RUNNING, {"conditions": [condition("Failed", "FailedJobs", "jobset failed: node-0 exited 1")]}],
                    logs=["epoch 1\nTrainingError: loss is nan at step 12"])
    with pytest.raises(TrainJobFailed) as err:
        launch(kube, job())
    text = str(err.value)
    assert "FailedJobs: jobset failed: node-0 exited 1" in text and "loss is nan at step 12" in text
    assert f"{job_name('run-1')}-node-0-0-aaaaa" in text and not kube.deleted


def test_timeout_deletes_the_job_and_says_where_it_was():
    suspended = {"conditions": [condition("Suspended", "Suspended")]}
    kube, clock = FakeKube([suspended]), Clock()
    with pytest.raises(TrainJobFailed, match=r"did not finish within 60 s \(suspended \(waiting for Kueue"):
        launch(kube, job(), timeout=60, clock=clock)
    assert kube.deleted == [(job_name("run-1"), "Foreground")] and 60 <= clock.now <= 70


def test_a_retried_step_follows_its_running_job_instead_of_creating_another():
    existing = {**job(), "status": RUNNING}
    kube = FakeKube([{"conditions": [condition("Complete")]}], existing=existing)
    state, lines = launch(kube, job())
    assert not kube.created and not kube.deleted and any("exists already" in line for line in lines)
    assert state["status"]["conditions"][0]["type"] == "Complete"


def test_a_retried_step_replaces_its_failed_job():
    existing = {**job(), "status": {"conditions": [condition("Failed", "BackoffLimitExceeded", "x")]}}
    kube = FakeKube([RUNNING, {"conditions": [condition("Complete")]}], existing=existing)
    _, lines = launch(kube, job())
    assert kube.deleted == [(job_name("run-1"), "Foreground")] and len(kube.created) == 1
    assert any("replacing it" in line for line in lines)


def test_create_refused_by_the_api_is_one_clear_error():
    kube = FakeKube([{}], create_error=ApiException(status=403, reason="Forbidden"))
    with pytest.raises(TrainJobFailed, match=r"cannot create TrainJob finetune/finetune-\w+: 403 Forbidden"):
        launch(kube, job())


def test_a_complete_job_without_a_model_fails_the_step_and_leaves_the_outputs_empty(tmp_path):
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "meta.json").write_text("{}")
    kube = FakeKube([{"conditions": [condition("Complete")]}])
    cfg = config_from_dict({"launch": {"launcher": "trainjob"}})
    with pytest.raises(TrainJobFailed, match=r"completed but wrote no .*/model \(rank 0 writes it\)"):
        train_on_cluster(cfg, settings(mount=str(tmp_path / "shared")), IMAGE, "run-9", str(tmp_path / "tokens"),
                         str(tmp_path / "model"), str(tmp_path / "logs"), apis=(kube, kube))
    work = tmp_path / "shared" / job_name("run-9")
    assert (work / "tokenize" / "meta.json").read_text() == "{}"  # staged for the nodes
    assert yaml.safe_load((work / "params.yaml").read_text())["launch"]["launcher"] == "trainjob"
    assert not (tmp_path / "model").exists() and not (tmp_path / "logs").exists()


# ---- the TrainJob's command trains (2 CPU processes, as the Trainer starts them) ----

@pytest.mark.integration
def test_the_trainjob_command_trains_with_two_processes_and_hands_the_model_on(tiny_model_nodropout, tmp_path):
    """The pipeline step's whole path against a fake API whose 'Trainer' runs the TrainJob's exact command with the
    PET_* variables the Trainer's torch plugin sets (1 node, 2 processes); the shared volume is a local folder."""
    from finetune.common.config import TokenizeConfig
    from finetune.stages.tokenize import tokenize, write_tokens

    df = toy_frame(50).sample(frac=1, random_state=0)
    tokens, meta = tokenize({"train": df.iloc[:64], "val": df.iloc[64:80], "test": df.iloc[80:]}, ["fresh", "rotten"],
                            tiny_model_nodropout, TokenizeConfig(max_length=16))
    write_tokens(tokens, meta, tmp_path / "step-tokens")
    cfg = config_from_dict({"model": {"base": str(tiny_model_nodropout)},
                            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 3e-3, "seed": 3, "threads": 1,
                                      "device": "cpu", "checkpoint_every": 4},
                            "launch": {"launcher": "trainjob", "nodes": 1, "procs_per_node": 2}})
    shared = tmp_path / "shared"
    shared.mkdir()
    runs = []

    def trainer(body):  # what Kubeflow Trainer does with the TrainJob on one node
        t = body["spec"]["trainer"]
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
               "PET_NNODES": str(t["numNodes"]), "PET_NPROC_PER_NODE": str(t["numProcPerNode"]),
               "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
        runs.append(subprocess.run(t["command"], env=env, capture_output=True, text=True, timeout=600))
        kube.logs = [runs[-1].stdout + runs[-1].stderr]  # what rank 0's container would have logged

    kube, lines = FakeKube([{"conditions": [condition("Complete")]}], on_create=trainer), []
    result = train_on_cluster(cfg, settings(mount=str(shared), gpus=0), IMAGE, "run-7", str(tmp_path / "step-tokens"),
                              str(tmp_path / "out-model"), str(tmp_path / "out-logs"), apis=(kube, kube),
                              emit=lines.append)
    (proc,) = runs
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = shared / job_name("run-7")
    assert result == {"trainjob": job_name("run-7"), "workdir": str(work)}
    assert any("trained 16 steps" in line for line in lines), lines  # the step shows the nodes' log
    assert kube.created[0]["spec"]["trainer"]["command"][4:] == [
        "--params", f"{work}/params.yaml", "--tokens", f"{work}/tokenize", "--model", f"{work}/model",
        "--train-logs", f"{work}/train", "--checkpoints", f"{work}/checkpoints"]
    summary = json.loads((tmp_path / "out-logs" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 16
    losses = [float(r.split(",")[1]) for r in (tmp_path / "out-logs" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 16 and min(losses[-4:]) < losses[0]  # it learned
    saved = json.loads((tmp_path / "out-model" / "finetune_config.json").read_text())
    assert saved["launch"] == {"launcher": "trainjob", "nodes": 1, "procs_per_node": 2}
    assert (tmp_path / "out-model" / "model.safetensors").is_file()
    # checkpoints went to the shared volume (a restarted job resumes from there; resume: tests/training/test_train.py);
    # the finished model supersedes them, so none is left
    assert (work / "checkpoints").is_dir() and not list((work / "checkpoints").glob("step-*"))


# ---- the pipeline with the TrainJob launcher ----

def test_pipeline_compiles_with_the_trainjob_launcher(tmp_path):
    from pipelines.finetune_pipeline import compile_spec

    cfg = load_config(REPO / "params.yaml", ["launch.launcher=trainjob", "launch.nodes=2"])
    docs = list(yaml.safe_load_all(compile_spec(tmp_path / "p.yaml", cfg, CLUSTER).read_text()))
    spec, k8s = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    program = "\n".join(train["command"] + train.get("args", []))
    assert "train_on_cluster" in program and "run_train" not in program  # the launcher, not the single-pod step
    assert "accelerator" not in train["resources"]  # the nodes hold the GPUs, not this step
    assert train["resources"]["cpuLimit"] == float(CLUSTER["resources"]["cpu"])
    volume = CLUSTER["trainjob"]["shared_volume"]
    assert k8s["exec-train"]["pvcMount"] == [{"constant": volume["claim"], "mountPath": volume["mount"],
                                              "pvcNameParameter": {"runtimeValue": {"constant": volume["claim"]}}}]
    assert "nodeSelector" not in k8s["exec-train"] and "tolerations" not in k8s["exec-train"]
    tasks = next(c for n, c in spec["components"].items() if n.startswith("comp-condition")
                 and "train" in c["dag"]["tasks"])["dag"]["tasks"]
    inputs = tasks["train"]["inputs"]["parameters"]
    assert inputs["image"]["runtimeValue"]["constant"] == IMAGE
    assert inputs["cluster"]["runtimeValue"]["constant"]["trainjob"] == CLUSTER["trainjob"]
    assert inputs["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # evaluate and register read the train step's artifacts exactly as in the single-pod DAG
    assert tasks["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model", "producerTask": "train"}
    assert k8s["exec-train"]["podMetadata"]["labels"] == {CLUSTER["pod_label"]["key"]: CLUSTER["pod_label"]["value"]}
    # params.yaml's default (launch.launcher: local) keeps the single-pod GPU step
    single = next(yaml.safe_load_all(compile_spec(tmp_path / "s.yaml", None, CLUSTER).read_text()))
    assert "run_train" in "\n".join(single["deploymentSpec"]["executors"]["exec-train"]["container"]["command"])
