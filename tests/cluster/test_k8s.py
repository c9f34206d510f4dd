"""The k8s/ manifests, checked offline: both overlays (and prod + PyTorchJob) render with kustomize, every object
validates strictly against the Kubernetes 1.32 schemas, the PyTorchJob against k8s/schemas/pytorchjob-v1.json,
and the rendered objects follow the deployment rules (secrets, images, limits, non-root, probes, network)."""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import K8S_VERSION, MARKERS, NAMESPACE, REPO, SETTINGS, kubernetes_validate
from stack import PLACEHOLDER, Manifests, read_env_file, render_text

K8S = REPO / "k8s"
OVERLAYS = ["dev", "prod", "prod-distributed", "prod-trainjob", "prod-tune"]
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
# Values that must never appear in clear text in a rendered object (Secrets hold them base64-encoded).


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    out = {}
    for overlay in OVERLAYS:
        text = render_text(overlay, MARKERS)
        path = tmp_path_factory.mktemp("rendered") / f"{overlay}.yaml"
        path.write_text(text)
        out[overlay] = (path, [d for d in yaml.safe_load_all(text) if d])
    return out


def objs(rendered, overlay: str, kind: str | None = None) -> list[dict]:
    return [o for o in rendered[overlay][1] if kind is None or o["kind"] == kind]


def pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "Experiment":  # Katib: each trial is this Job's pod
        return [obj["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]]
    if obj["kind"] == "TrainingRuntime":
        return [r["template"]["spec"]["template"]["spec"] for r in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    if obj["kind"] in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    return []


def all_pods(rendered) -> list[tuple[str, str, dict]]:
    return [(overlay, f"{o['kind']}/{o['metadata']['name']}", spec)
            for overlay in OVERLAYS for o in objs(rendered, overlay) for spec in pod_specs(o)]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]




# ---- rendering and schemas ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates_strictly(rendered, overlay):
    path, docs = rendered[overlay]
    proc = kubernetes_validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    core = [o for o in docs if "kubeflow.org" not in o["apiVersion"]]
    passed = [line for line in proc.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == len(core) >= 10, proc.stdout
    for o in core:
        assert o["metadata"].get("namespace", NAMESPACE) == NAMESPACE, o["metadata"]
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE  # every object lands in the one namespace


def test_strict_validation_is_really_strict(tmp_path, rendered):
    """The same command rejects a typo'd field and a wrong type: a clean pass above means something."""
    mlflow = next(o for o in objs(rendered, "dev", "Deployment") if o["metadata"]["name"] == "mlflow")
    typo = copy.deepcopy(mlflow)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 5000}}
    wrong_type = copy.deepcopy(mlflow)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        proc = kubernetes_validate(tmp_path / "bad.yaml")
        assert proc.returncode != 0 and "did not validate" in proc.stdout + proc.stderr, proc.stdout


def pytorchjob(rendered) -> dict:
    (job,) = objs(rendered, "prod-distributed", "PyTorchJob")
    return job


def test_pytorchjob_matches_the_crd_schema_and_its_pods_the_core_schema(rendered):
    import kubernetes_validate as kv

    schema = json.loads((K8S / "schemas" / "pytorchjob-v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    job = pytorchjob(rendered)
    jsonschema.Draft202012Validator(schema).validate(job)
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "replica"},
                    "template": replica["template"]}
        kv.validate(template, K8S_VERSION, strict=True)  # raises on any unknown field or bad type
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    main = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert main["name"] == "pytorch" and "torchrun --no-python finetune train" in main["args"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the dev/prod overlays carry no PyTorchJob: it needs the training operator's CRDs, so it is opt-in
    assert not objs(rendered, "dev", "PyTorchJob") and not objs(rendered, "prod", "PyTorchJob")


def test_katib_experiment_renders_with_the_project_image_and_its_trial_job_validates(rendered):
    """prod-tune: the generated Experiment (tests/tuning/test_tune.py checks it against params.yaml) after kustomize:
    Katib schema, image tag and namespace from the settings component, the trial Job strict against the core
    schema, its pods admitted to S3 by the network policies."""
    import kubernetes_validate as kv

    (exp,) = objs(rendered, "prod-tune", "Experiment")
    jsonschema.Draft202012Validator(json.loads((K8S / "schemas" / "experiment-v1beta1.json").read_text())
                                    ).validate(exp)
    assert exp["metadata"]["namespace"] == NAMESPACE
    job = exp["spec"]["trialTemplate"]["trialSpec"]
    assert "namespace" not in job.get("metadata", {})  # Katib sets the trial's own name and namespace
    kv.validate({**job, "metadata": {"name": "trial"}}, K8S_VERSION, strict=True)
    image = (REPO / "components" / "image.txt").read_text().strip()
    assert {c["image"] for c in containers(job["spec"]["template"]["spec"])} == {image}
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    label = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())["pod_label"]
    assert pod_labels[label["key"]] == label["value"]  # the label the MLflow and S3 policies admit
    assert not any(objs(rendered, o, "Experiment") for o in OVERLAYS if o != "prod-tune")


def test_pytorchjob_runs_the_five_verbs_with_options_the_cli_accepts(rendered):
    from finetune.cli import build_parser

    spec = pytorchjob(rendered)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    script = " && ".join(c["args"][0] for c in containers(spec))
    calls = re.findall(r"finetune (?:validate|tokenize|train|evaluate|compress|register)\b[^&;]*", script)
    assert [c.split()[1] for c in calls] == ["validate", "tokenize", "train", "evaluate", "compress", "register"], script
    for call in calls:
        args = build_parser().parse_args(shlex.split(call.replace('"$DATA_URI"', "s3://bucket/key"))[1:])  # exits if unknown
        # the image has no params.yaml in its working directory: every stage reads the copy the Dockerfile puts
        # at this path (tests/cluster/test_image.py checks it is the project's params.yaml)
        assert args.params == "/opt/finetune/params.yaml", call
    assert "--compress /work/compress" in script  # register gets the int8 variant as in the pipeline


@pytest.mark.parametrize("mutate, message", [
    (lambda j: j["spec"].update(pytorchReplicaSpec=j["spec"].pop("pytorchReplicaSpecs")), "pytorchReplicaSpecs"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(restartPolicy="Sometimes"), "Sometimes"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Worker"]), "Chief"),
    (lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Never"), "Never"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(name="main"),
     "pytorch"),
    (lambda j: j["spec"].update(nprocPerNode=2), "nprocPerNode"),
    (lambda j: j.update(apiVersion="kubeflow.org/v2"), "kubeflow.org/v1"),
])
def test_pytorchjob_schema_rejects_broken_jobs(rendered, mutate, message):
    assert_schema_rejects("pytorchjob-v1.json", pytorchjob(rendered), mutate, message)


def assert_schema_rejects(schema_file: str, obj: dict, mutate, message: str) -> None:
    """``mutate`` (on a copy of ``obj``) breaks it: the checked-in schema refuses it, naming ``message``."""
    schema = json.loads((K8S / "schemas" / schema_file).read_text())
    broken = copy.deepcopy(obj)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.Draft202012Validator(schema).validate(broken)
    assert message in str(err.value)


# ---- one place for each setting ----

def test_project_image_tag_has_one_place():
    """components/image.txt (what the KFP components run) is the kustomize images entry, and k8s/ names the
    project image nowhere else."""
    image = (REPO / "components" / "image.txt").read_text().strip()
    entry = next(i for i in SETTINGS["images"] if i["name"] == "finetune")
    assert f"{entry['newName']}:{entry['newTag']}" == image
    mentions = subprocess.run(["git", "grep", "-l", "--untracked", image.split(":")[0], "--", "k8s"], cwd=REPO,
                              capture_output=True, text=True).stdout.split()
    assert mentions == ["k8s/components/settings/kustomization.yaml"]


def test_namespace_and_storage_class_are_set_once(rendered):
    files = [p for p in K8S.rglob("kustomization.yaml")]
    with_ns = [p.relative_to(K8S).as_posix() for p in files if "namespace" in yaml.safe_load(p.read_text())]
    assert with_ns == ["components/settings/kustomization.yaml"]
    for overlay in OVERLAYS:
        for ns in objs(rendered, overlay, "Namespace"):
            assert ns["metadata"]["name"] == NAMESPACE
    (config,) = objs(rendered, "dev", "ConfigMap")
    claims = [o["spec"] for o in objs(rendered, "dev", "PersistentVolumeClaim")] + \
             [t["spec"] for s in objs(rendered, "dev", "StatefulSet") for t in s["spec"]["volumeClaimTemplates"]]
    assert len(claims) == 2 and {c["storageClassName"] for c in claims} == {config["data"]["STORAGE_CLASS"]}


# ---- secrets ----

def test_pipeline_secrets_have_the_names_and_keys_the_pipeline_reads(rendered):
    cluster = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())["secrets"]
    for overlay in OVERLAYS:
        secrets = {o["metadata"]["name"]: o for o in objs(rendered, overlay, "Secret")}
        for wanted in cluster.values():
            assert set(secrets[wanted["name"]]["data"]) == set(wanted["env"]), (overlay, wanted["name"])


def tracked(*pathspec: str) -> list[str]:
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *pathspec],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def test_no_secret_values_in_committed_files():
    files = tracked("k8s")
    assert files and not [f for f in files if f.endswith(".env")], "env files must stay out of git"
    examples = [f for f in files if f.endswith(".env.example")]
    assert len(examples) == 6
    for f in examples:
        # the real file next to the example is git-ignored
        ignored = subprocess.run(["git", "check-ignore", "-q", f.removesuffix(".example")], cwd=REPO)
        assert ignored.returncode == 0, f"{f.removesuffix('.example')} is not git-ignored"
        for key, value in read_env_file(REPO / f).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
                assert value == PLACEHOLDER, (f, key)
            assert "@" not in value, (f, key)  # no credentials inside URIs either
    for f in files:
        if f.endswith((".yaml", ".yml")):
            for doc in yaml.safe_load_all((REPO / f).read_text()):
                assert not (doc or {}).get("kind") == "Secret", f"{f}: a committed Secret object"
                for gen in (doc or {}).get("secretGenerator", []):
                    assert set(gen) <= {"name", "envs", "options", "behavior"}, f"{f}: {gen['name']} not from envs"


def test_secret_values_reach_pods_only_through_secret_references(rendered):
    """Rendered with known secret values: they appear nowhere in clear text (only base64 inside Secrets)."""
    for overlay in OVERLAYS:
        text = rendered[overlay][0].read_text()
        for marker in MARKERS.values():
            assert marker not in text, (overlay, marker)
        m = Manifests(rendered[overlay][1])
        assert m.secrets["finetune-s3"]["AWS_SECRET_ACCESS_KEY"] == MARKERS["AWS_SECRET_ACCESS_KEY"]
        mlflow = m.env(m.container("Deployment", "mlflow"))
        password = MARKERS["POSTGRES_PASSWORD"]
        assert mlflow["MLFLOW_BACKEND_STORE_URI"].startswith(f"postgresql+psycopg2://mlflow:{password}@")


# ---- workload policies ----

def test_images_are_pinned_never_latest(rendered):
    pods = all_pods(rendered)
    # dev: mlflow, s3, postgres, bucket job; prod: mlflow; prod-distributed: mlflow + 2 replicas;
    # prod-trainjob: mlflow + the TrainingRuntime's node; prod-tune: mlflow + the Katib trial's Job
    assert len(pods) == 12
    for overlay, name, spec in pods:
        for c in containers(spec):
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert "/" in repo and tag and "/" not in tag, f"{overlay} {name}: untagged image {image}"
            assert tag != "latest" and not tag.startswith("latest"), f"{overlay} {name}: {image}"


def test_every_container_has_requests_and_limits(rendered):
    for overlay, name, spec in all_pods(rendered):
        for c in containers(spec):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{overlay} {name}/{c['name']}: no {kind}"


def test_pods_run_as_non_root_with_read_only_root(rendered):
    for overlay, name, spec in all_pods(rendered):
        assert spec["securityContext"]["runAsNonRoot"] is True, (overlay, name)
        assert spec["securityContext"]["runAsUser"] > 0, (overlay, name)
        emptydirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in emptydirs, f"{overlay} {name}/{c['name']}: no writable /tmp"


def test_every_long_running_container_has_probes(rendered):
    for overlay in OVERLAYS:
        for kind in ("Deployment", "StatefulSet"):
            for o in objs(rendered, overlay, kind):
                for c in o["spec"]["template"]["spec"]["containers"]:
                    assert c.get("livenessProbe") and c.get("readinessProbe"), (overlay, o["metadata"]["name"])


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the policies here use matchLabels only
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def allowed_peers(policies: list[dict], pod_labels: dict) -> list[dict]:
    """The `from` peers of every ingress rule of every policy that selects pods with ``pod_labels``."""
    chosen = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels)]
    return [peer for p in chosen for rule in p["spec"].get("ingress", []) for peer in rule.get("from", [])]


def test_network_policies_fence_mlflow_postgres_and_s3(rendered):
    pipeline_pod = {"finetune/pipeline-access": "true"}
    for overlay in OVERLAYS:
        policies = objs(rendered, overlay, "NetworkPolicy")
        for kind in ("Deployment", "StatefulSet"):
            for o in objs(rendered, overlay, kind):
                labels = o["spec"]["template"]["metadata"]["labels"]
                assert [p for p in policies if selects(p["spec"]["podSelector"], labels)], \
                    f"{overlay}: {kind}/{o['metadata']['name']} is not isolated by any NetworkPolicy"
        # MLflow: pipeline pods only (from any namespace), nothing else
        peers = allowed_peers(policies, {"app.kubernetes.io/name": "mlflow"})
        assert peers == [{"namespaceSelector": {}, "podSelector": {"matchLabels": pipeline_pod}}], peers
    # PostgreSQL (dev, in-cluster): MLflow only
    peers = allowed_peers(objs(rendered, "dev", "NetworkPolicy"), {"app.kubernetes.io/name": "postgres"})
    assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    # the pods that need them carry the labels the policies admit
    train = pytorchjob(rendered)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": pipeline_pod}, train)


# ---- what each overlay deploys ----

def test_dev_is_self_contained_and_prod_is_ha_with_external_stores(rendered):
    def names(overlay, kind):
        return {o["metadata"]["name"] for o in objs(rendered, overlay, kind)}

    assert names("dev", "StatefulSet") == {"finetune-postgres"} and names("dev", "Job") == {"finetune-bucket"}
    assert names("dev", "Deployment") == {"mlflow", "seaweedfs"} and not names("dev", "PodDisruptionBudget")
    assert names("prod", "Deployment") == {"mlflow"} and not names("prod", "StatefulSet")
    (mlflow_dev,) = [o for o in objs(rendered, "dev", "Deployment") if o["metadata"]["name"] == "mlflow"]
    (mlflow_prod,) = objs(rendered, "prod", "Deployment")
    assert mlflow_dev["spec"]["replicas"] == 1 and mlflow_prod["spec"]["replicas"] == 2
    (pdb,) = objs(rendered, "prod", "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"], mlflow_prod["spec"]["template"]["metadata"]["labels"])
    dev, prod = Manifests(objs(rendered, "dev")), Manifests(objs(rendered, "prod"))
    dev_env = dev.env(dev.container("Deployment", "mlflow"))
    assert dev_env["MLFLOW_BACKEND_STORE_URI"].endswith("@finetune-postgres:5432/mlflow")
    assert dev.secrets["finetune-s3"]["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
    prod_env = prod.env(prod.container("Deployment", "mlflow"))
    assert "@mlflow-db.example.internal:5432/" in prod_env["MLFLOW_BACKEND_STORE_URI"]
    argv = prod.argv(prod.container("Deployment", "mlflow"), prod_env)
    assert argv[:2] == ["mlflow", "server"] and "--artifacts-destination=s3://finetune-prod/mlflow-artifacts" in argv


def test_pipeline_identity_can_read_only_its_secrets(rendered):
    (role,) = objs(rendered, "dev", "Role")
    (binding,) = objs(rendered, "dev", "RoleBinding")
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [{"apiGroups": [""], "resources": ["secrets"],
                             "resourceNames": ["finetune-s3", "finetune-mlflow"], "verbs": ["get"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "finetune-pipeline", "namespace": NAMESPACE}]
    assert {o["metadata"]["name"] for o in objs(rendered, "dev", "ServiceAccount")} >= {"finetune-pipeline"}


# ---- Kubeflow Trainer v2: the TrainingRuntime and the TrainJobs built against it ----

CLUSTER = yaml.safe_load((REPO / "pipelines" / "cluster.yaml").read_text())


def training_runtime(rendered) -> dict:
    (runtime,) = objs(rendered, "prod-trainjob", "TrainingRuntime")
    return runtime


def runtime_pod(runtime: dict) -> dict:
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]["template"]


def strict_pod_template(template: dict) -> None:
    import kubernetes_validate as kv

    kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "node"}, "template": template},
                K8S_VERSION, strict=True)  # raises on any unknown field or bad type


def test_training_runtime_matches_the_crd_schema_and_the_cluster_settings(rendered):
    schema = json.loads((K8S / "schemas" / "trainingruntime-v1alpha1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    runtime = training_runtime(rendered)
    jsonschema.Draft202012Validator(schema).validate(runtime)
    tj = CLUSTER["trainjob"]
    assert (runtime["kind"], runtime["metadata"]["name"]) == (tj["runtime_kind"], tj["runtime"])
    assert runtime["metadata"]["namespace"] == tj["namespace"] == NAMESPACE
    assert runtime["spec"]["mlPolicy"]["torch"] == {}  # the Trainer's torch plugin: PET_* variables for torchrun
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node" and node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    pod = runtime_pod(runtime)
    strict_pod_template(pod)
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "node"
    assert container["image"] == (REPO / "components" / "image.txt").read_text().strip()
    shared = next(v for v in pod["spec"]["volumes"] if v["name"] == "shared")
    assert shared["persistentVolumeClaim"]["claimName"] == tj["shared_volume"]["claim"]
    assert {"name": "shared", "mountPath": tj["shared_volume"]["mount"]} in container["volumeMounts"]
    (claim,) = [o for o in objs(rendered, "prod-trainjob", "PersistentVolumeClaim")
                if o["metadata"]["name"] == tj["shared_volume"]["claim"]]
    (config,) = objs(rendered, "prod-trainjob", "ConfigMap")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node and the pipeline step mount it
    data = config["data"]
    assert claim["spec"]["storageClassName"] == data["SHARED_STORAGE_CLASS"] != data["STORAGE_CLASS"]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["spec"]["mlPolicy"].update(torch={"numProcPerNode": 2}), "numProcPerNode"),
    (lambda r: r["spec"]["mlPolicy"].update(numNodes="2"), "'2'"),
    (lambda r: r["spec"]["template"]["spec"].update(replicatedJob=[]), "replicatedJob"),
    (lambda r: r.update(kind="ClusterTrainingRuntimes"), "TrainingRuntime"),
])
def test_training_runtime_schema_rejects_broken_runtimes(rendered, mutate, message):
    assert_schema_rejects("trainingruntime-v1alpha1.json", training_runtime(rendered), mutate, message)


def test_trainjob_pods_as_the_trainer_builds_them_validate_and_reach_mlflow_and_their_peers(rendered):
    """The runtime's pod with what the pipeline's TrainJob (built from cluster.yaml) sets on it, merged as the
    Trainer does: strict core schema, GPU pool placement, the labels the network policies admit."""
    from finetune.cluster.trainjob import TrainJobSettings, build_trainjob
    from finetune.common.config import LaunchConfig

    tj = build_trainjob("finetune-abc", LaunchConfig(launcher="trainjob", nodes=2), TrainJobSettings.from_cluster(
        CLUSTER), (REPO / "components" / "image.txt").read_text().strip())
    pod = copy.deepcopy(runtime_pod(training_runtime(rendered)))
    (patch,) = tj["spec"]["runtimePatches"]
    (node_patch,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod_patch = node_patch["template"]["spec"]["template"]
    pod["metadata"]["labels"].update(pod_patch["metadata"]["labels"])
    pod["spec"].update(pod_patch["spec"])
    trainer, container = tj["spec"]["trainer"], pod["spec"]["containers"][0]
    container.update(image=trainer["image"], command=trainer["command"], resources=trainer["resourcesPerNode"])
    strict_pod_template(pod)
    assert pod["spec"]["nodeSelector"] == CLUSTER["gpu"]["node_selector"]
    assert pod["spec"]["tolerations"] == CLUSTER["gpu"]["tolerations"]
    assert container["resources"]["limits"][CLUSTER["gpu"]["accelerator"]] == str(CLUSTER["gpu"]["count"])
    policies = objs(rendered, "prod-trainjob", "NetworkPolicy")
    labels = pod["metadata"]["labels"]
    mlflow_peers = allowed_peers(policies, {"app.kubernetes.io/name": "mlflow"})
    assert any(selects(peer["podSelector"], labels) for peer in mlflow_peers)  # rank 0 may talk to MLflow/S3
    node_peers = allowed_peers(policies, labels)
    assert any(selects(peer["podSelector"], labels) for peer in node_peers)  # torchrun rendezvous, NCCL


def test_pipeline_identity_may_run_trainjobs_and_the_nodes_have_no_api_rights(rendered):
    roles = {o["metadata"]["name"]: o for o in objs(rendered, "prod-trainjob", "Role")}
    bindings = {o["metadata"]["name"]: o for o in objs(rendered, "prod-trainjob", "RoleBinding")}
    rules = [r for r in roles["finetune-trainjob"]["rules"] if "trainer.kubeflow.org" in r["apiGroups"]]
    assert rules == [{"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
                      "verbs": ["get", "list", "watch", "create", "delete"]}]
    assert bindings["finetune-trainjob"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "finetune-pipeline", "namespace": NAMESPACE}]
    pipeline_rules = roles["finetune-pipeline"]["rules"]  # follows the nodes' logs with the base Role
    assert {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]} in pipeline_rules
    pod = runtime_pod(training_runtime(rendered))["spec"]
    assert pod["serviceAccountName"] == "finetune-train" and pod["automountServiceAccountToken"] is False
    subjects = [s["name"] for b in bindings.values() for s in b["subjects"]]
    assert "finetune-train" not in subjects
