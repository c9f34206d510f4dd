"""The train stage as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1, checked against Trainer v2.3.0): build the
object, create it through the Kubernetes API, follow its status and rank 0's log, and fail with the job's own
reason when it fails or runs out of time.

Hand-off through a ReadWriteMany volume mounted at the same path by the pipeline's train step and by every node:
the step puts the tokens and the resolved params under ``<mount>/<job>/``, every node reads them from there,
rank 0 writes the model, the training logs and the checkpoints next to them (a restarted job resumes from those),
and the step copies model and logs into its own output artifacts, so evaluate gets the model exactly as from the
single-pod path.

Kubernetes API directly (the ``kubernetes`` client that kfp already depends on), not the ``kubeflow`` SDK's
TrainerClient: one create, one get and two pod reads are all this needs, and the objects are plain dicts that
the same code renders for the offline schema test.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import yaml
from kubernetes import client, config
from kubernetes.client import ApiException

from finetune.common.coercion import ConfigError
from finetune.common.config import Config, LaunchConfig
from finetune.common.params import drop_none

log = logging.getLogger("finetune")


GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"

TRAINER_VERSION = "v2.3.0"  # the release whose CRDs k8s/schemas/*-v1alpha1.json are derived from
CONTAINER = "node"  # the trainer container of the runtime's "node" replicated job


JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet names it after the TrainJob and labels every pod


RANK0_LABEL = "batch.kubernetes.io/job-completion-index=0"  # the nodes are one indexed Job: index = node rank


QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


# owner of our entry in spec.runtimePatches; the Trainer's webhook wants a domain-prefixed path (as Kueue's
# "kueue.x-k8s.io/manager")
PATCH_MANAGER = "finetune-project.github.io/launcher"


LOG_TAIL = 40  # log lines quoted in a failure


WHERE = "pipelines/cluster.yaml"  # the cluster settings file, named in errors


class TrainJobFailed(RuntimeError):
    """The TrainJob failed, timed out or could not be created: message for the user, no traceback."""


@dataclass(frozen=True)
class TrainJobSettings:
    """Where and how TrainJobs run: pipelines/cluster.yaml (``trainjob:``, ``gpu:``, ``resources:``, ``pod_label:``)."""

    runtime: str
    runtime_kind: str
    namespace: str
    queue: str
    claim: str
    mount: str
    timeout_seconds: int
    poll_seconds: float
    accelerator: str
    gpus: int
    cpu: str
    memory: str
    pod_label: tuple[str, str]
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_cluster(cls, cluster: dict[str, Any]) -> TrainJobSettings:
        try:
            tj, gpu, res = cluster["trainjob"], cluster["gpu"], cluster["resources"]
            settings = cls(runtime=str(tj["runtime"]), runtime_kind=str(tj["runtime_kind"]),
                           namespace=str(tj["namespace"]), queue=str(tj.get("queue") or ""),
                           claim=str(tj["shared_volume"]["claim"]), mount=str(tj["shared_volume"]["mount"]),
                           timeout_seconds=int(tj["timeout_seconds"]), poll_seconds=float(tj["poll_seconds"]),
                           accelerator=str(gpu["accelerator"]), gpus=int(gpu["count"]),
                           cpu=str(res["train_cpu"]), memory=str(res["train_memory"]),
                           pod_label=(str(cluster["pod_label"]["key"]), str(cluster["pod_label"]["value"])),
                           node_selector={str(k): str(v) for k, v in (gpu.get("node_selector") or {}).items()},
                           tolerations=list(gpu.get("tolerations") or []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{WHERE}: trainjob/gpu/resources/pod_label incomplete or wrong: {exc!r}") from exc
        if settings.runtime_kind not in ("TrainingRuntime", "ClusterTrainingRuntime"):
            raise ConfigError(f"{WHERE}: trainjob.runtime_kind must be TrainingRuntime or ClusterTrainingRuntime")
        if not PurePosixPath(settings.mount).is_absolute():
            raise ConfigError(f"{WHERE}: trainjob.shared_volume.mount must be absolute, got {settings.mount!r}")
        if settings.timeout_seconds < 1 or settings.poll_seconds <= 0:
            raise ConfigError(f"{WHERE}: trainjob.timeout_seconds must be >= 1 and poll_seconds > 0")
        return settings


def job_name(run_id: str) -> str:
    """A DNS-1035 name per pipeline run: a retried train step finds its TrainJob and checkpoints again."""
    return "finetune-" + hashlib.sha256(run_id.encode()).hexdigest()[:12]


def workdir(settings: TrainJobSettings, name: str) -> PurePosixPath:
    return PurePosixPath(settings.mount) / name


def train_command(work: PurePosixPath) -> list[str]:
    """What every node runs. torchrun takes nodes, processes per node, rank and rendezvous address from the
    PET_* variables the Trainer's torch plugin sets, so the command itself names none of them."""
    return ["torchrun", "--no-python", "finetune", "train", "--params", str(work / "params.yaml"),
            "--tokens", str(work / "tokenize"), "--model", str(work / "model"),
            "--train-logs", str(work / "train"), "--checkpoints", str(work / "checkpoints")]


def build_trainjob(name: str, launch: LaunchConfig, settings: TrainJobSettings, image: str) -> dict[str, Any]:
    """The TrainJob for one pipeline run (validated against k8s/schemas/trainjob-v1alpha1.json in the tests)."""
    gpus = {settings.accelerator: str(settings.gpus)} if settings.gpus else {}
    per_node = {"cpu": settings.cpu, "memory": settings.memory, **gpus}
    procs = launch.procs_per_node or max(settings.gpus, 1)
    labels = {"app.kubernetes.io/name": "finetune-train", "app.kubernetes.io/part-of": "finetune"}
    if settings.queue:
        labels[QUEUE_LABEL] = settings.queue
    key, value = settings.pod_label
    pod_spec: dict[str, Any] = {}
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    pod = {"metadata": {"labels": {key: value}}, **({"spec": pod_spec} if pod_spec else {})}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": settings.runtime_kind, "name": settings.runtime},
            "trainer": {"image": image, "command": train_command(workdir(settings, name)),
                        "numNodes": launch.nodes, "numProcPerNode": procs,
                        "resourcesPerNode": {"requests": dict(per_node), "limits": dict(per_node)}},
            # the runtime's pods, patched per run from cluster.yaml: network-policy label, GPU pool placement
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": CONTAINER, "template": {"spec": {"template": pod}}}]}}}}],
            "activeDeadlineSeconds": settings.timeout_seconds,
        },
    }


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _progress(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    parts = [f"{j.get('name')}: {j.get('active') or 0} active, {j.get('ready') or 0} ready, "
             f"{j.get('succeeded') or 0} succeeded, {j.get('failed') or 0} failed"
             for j in status.get("jobsStatus") or []]
    if _condition(job, "Suspended"):
        parts.insert(0, "suspended (waiting for Kueue admission)")
    pct = (status.get("trainerStatus") or {}).get("progressPercentage")
    if pct is not None:
        parts.append(f"{pct}%")
    return "; ".join(parts) or "pending"


class _LogTail:
    """Rank 0's log, printed as it grows (the pod may be replaced when the job restarts)."""

    def __init__(self, core: Any, namespace: str, name: str, emit: Callable[[str], None]):
        self.core, self.namespace, self.name, self.emit = core, namespace, name, emit
        self.pod: str | None = None
        self.lines: list[str] = []

    def _rank0(self) -> str | None:
        pods = self.core.list_namespaced_pod(self.namespace,
                                             label_selector=f"{JOBSET_LABEL}={self.name},{RANK0_LABEL}").items
        started = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
        if not started:
            return None
        # after a restart the new pod (running, newest) is the one to follow, not the failed one it replaced
        newest = max(started, key=lambda p: (p.status.phase != "Failed", p.metadata.creation_timestamp or 0))
        return newest.metadata.name

    def poll(self) -> None:

        try:
            pod = self._rank0()
            if pod is None:
                return
            text = self.core.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER)
        except ApiException as exc:  # pod gone or container not started yet: try again next poll
            log.debug("log of TrainJob %s not readable yet: %s", self.name, exc.reason)
            return
        lines = text.splitlines()
        if pod != self.pod:
            self.pod, self.lines = pod, []
            self.emit(f"--- log of {pod} ---")
        for line in lines[len(self.lines):]:
            self.emit(line)
        self.lines = lines


def _get(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _delete(custom: Any, namespace: str, name: str) -> None:

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                               propagation_policy="Foreground")
    except ApiException as exc:
        if exc.status != 404:
            raise


def _create_or_adopt(custom: Any, job: dict[str, Any], emit: Callable[[str], None],
                     sleep: Callable[[float], None], poll: float, expired: Callable[[], bool]) -> dict[str, Any]:
    """Create the TrainJob; when a retried step finds one of the same name, follow it, or replace it when it had
    failed (its checkpoints stay on the shared volume, so the new one resumes)."""

    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    for _ in range(2):
        try:
            created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
            emit(f"created TrainJob {ns}/{name} ({job['spec']['trainer']['numNodes']} node(s))")
            return created
        except ApiException as exc:
            if exc.status != 409:
                raise TrainJobFailed(f"cannot create TrainJob {ns}/{name}: {exc.status} {exc.reason}: "
                                     f"{(exc.body or '')[:500]}") from exc
        existing = _get(custom, ns, name)
        if not _condition(existing, "Failed"):
            emit(f"TrainJob {ns}/{name} exists already (a retried step): following it")
            return existing
        emit(f"TrainJob {ns}/{name} exists and failed: replacing it (it resumes from its checkpoints)")
        _delete(custom, ns, name)
        while True:  # deletion is asynchronous (foreground: pods first)
            try:
                _get(custom, ns, name)
            except ApiException as exc:
                if exc.status == 404:
                    break
                raise
            if expired():
                raise TrainJobFailed(f"the failed TrainJob {ns}/{name} is still being deleted; delete it by hand")
            sleep(poll)
    raise TrainJobFailed(f"cannot create TrainJob {ns}/{name}: it keeps existing")


def run_trainjob(job: dict[str, Any], custom: Any, core: Any, timeout: float, poll: float,
                 emit: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Create (or adopt) ``job``, print its progress and rank 0's log until it completes; return its last state.
    Raises TrainJobFailed with the job's Failed condition and the log's last lines, or after ``timeout``
    seconds (queueing included), having deleted the job so it frees its nodes."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    deadline = clock() + timeout
    state = _create_or_adopt(custom, job, emit, sleep, poll, lambda: clock() >= deadline)
    tail = _LogTail(core, ns, name, emit)
    last = None
    while True:
        state = _get(custom, ns, name)
        tail.poll()
        progress = _progress(state)
        if progress != last:
            emit(f"TrainJob {ns}/{name}: {progress}")
            last = progress
        if _condition(state, "Complete"):
            emit(f"TrainJob {ns}/{name} complete")
            return state
        failed = _condition(state, "Failed")
        if failed:
            logs = "\n".join(tail.lines[-LOG_TAIL:]) or "(no log read)"
            raise TrainJobFailed(f"TrainJob {ns}/{name} failed: {failed.get('reason')}: {failed.get('message')}\n"
                                 f"last lines of {tail.pod or 'rank 0'}:\n{logs}")
        if clock() >= deadline:
            _delete(custom, ns, name)
            raise TrainJobFailed(f"TrainJob {ns}/{name} did not finish within {timeout:g} s ({progress}); deleted it")
        sleep(poll)


def kubernetes_apis() -> tuple[Any, Any]:
    """CustomObjectsApi and CoreV1Api from the pod's service account (in a pipeline step) or ~/.kube/config."""

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def train_on_cluster(cfg: Config, settings: TrainJobSettings, image: str, run_id: str, tokens: str,
                     model: str, logs: str, apis: tuple[Any, Any] | None = None,
                     emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The pipeline's train step with ``launch.launcher: trainjob``: stage tokens and params on the shared volume
    (mounted here at ``settings.mount``), run the TrainJob, copy model and training logs into ``model``/``logs``.
    Progress and rank 0's log go to stdout (the step's log in the KFP UI; no logging is configured there)."""



    name = job_name(run_id)
    work = Path(workdir(settings, name))
    staged = work / "tokenize"
    if not (staged / "meta.json").is_file():  # a retried step keeps what it staged (and the checkpoints)
        partial = work / ".tokenize.partial"  # renamed when complete: a half copy is never taken for the tokens
        for stale in (staged, partial):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.copytree(tokens, partial)
        partial.rename(staged)
    (work / "params.yaml").write_text(yaml.safe_dump(drop_none(cfg.to_dict()), sort_keys=False), encoding="utf-8")
    custom, core = apis or kubernetes_apis()
    job = build_trainjob(name, cfg.launch, settings, image)
    run_trainjob(job, custom, core, settings.timeout_seconds, settings.poll_seconds,
                 emit=emit or (lambda line: print(line, flush=True)))
    for src, dst in ((work / "model", Path(model)), (work / "train", Path(logs))):
        if not src.is_dir():
            raise TrainJobFailed(f"TrainJob {name} completed but wrote no {src} (rank 0 writes it)")
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return {"trainjob": name, "workdir": str(work)}
