"""The production stack on one machine: PostgreSQL, SeaweedFS S3 and an MLflow tracking server, on 127.0.0.1.

Nothing here is configured by hand: the stack renders k8s/overlays/dev (with its own throw-away secrets) and
runs what the manifests describe, the same commands, environment variable names, secret keys and ConfigMap
values the pods get, with only the addresses made local. So the tests that use it (tests/pipeline/test_stack.py) also
test the manifests' wiring, and a developer gets the same stack:

    python tests/stack.py up [--root .stack]         # `make stack-up`: start, wait until healthy, print exports
    python tests/stack.py down [--root .stack]       # `make stack-down`
    python tests/stack.py env-files k8s/overlays/dev  # write the overlay's *.env files with fresh secrets
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
BIN = Path(sys.executable).parent
PLACEHOLDER = "change-me"  # the value every secret has in the committed *.env.example files
PIPELINE_SECRETS = ("finetune-s3", "finetune-mlflow")  # what the KFP steps get (pipelines/cluster.yaml)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the manifests ----

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's secretGenerator reads them (comments and blank lines skipped)."""
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def write_env_files(overlay: Path, values: dict[str, str] | None = None) -> list[Path]:
    """Write each ``X.env.example`` of an overlay as ``X.env``: placeholders become fresh random secrets, keys in
    ``values`` take those values. Returns the files written."""
    written = []
    for example in sorted(overlay.glob("*.env.example")):
        pairs = read_env_file(example)
        for key, value in pairs.items():
            if key in (values or {}):
                pairs[key] = values[key]
            elif value == PLACEHOLDER:
                pairs[key] = secrets.token_hex(16)  # URL-safe: the database password ends up in a URI
        target = example.with_name(example.name.removesuffix(".example"))
        write_private(target, "".join(f"{k}={v}\n" for k, v in pairs.items()))
        written.append(target)
    return written


def render_text(overlay: str, values: dict[str, str] | None = None, k8s: Path = K8S) -> str:
    """``kubectl kustomize k8s/overlays/<overlay>`` on a scratch copy whose env files are made from the examples
    (the working tree is not touched, its own env files are not used)."""
    with tempfile.TemporaryDirectory(prefix="finetune-k8s-") as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(k8s, copy, ignore=shutil.ignore_patterns("*.env"))
        for overlay_dir in (copy / "overlays").iterdir():
            write_env_files(overlay_dir, values)
        proc = subprocess.run([str(BIN / "kubectl"), "kustomize", str(copy / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}")
        return proc.stdout


def render(overlay: str, values: dict[str, str] | None = None, k8s: Path = K8S) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(overlay, values, k8s)) if d]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args: defined names are replaced, $$ is a
    literal $, anything else stays as written."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", sub, value)


def with_flags(args: list[str], flags: dict[str, Any]) -> list[str]:
    """Replace (or append) ``-flag=value`` / ``--flag=value`` items of an argument list."""
    names = [a.split("=", 1)[0] for a in args]
    out = [f"{n}={flags[n]}" if n in flags else a for n, a in zip(names, args)]
    return out + [f"{k}={v}" for k, v in flags.items() if k not in names]


class Manifests:
    """Rendered objects, with secrets decoded and a container's environment resolved as the kubelet does."""

    def __init__(self, objects: list[dict[str, Any]], config: dict[str, str] | None = None):
        self.objects = objects
        self.secrets = {o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
                        for o in objects if o["kind"] == "Secret"}
        self.configmaps = {o["metadata"]["name"]: dict(o.get("data", {})) for o in objects if o["kind"] == "ConfigMap"}
        for data in self.configmaps.values():  # local addresses instead of Service names
            data.update({k: v for k, v in (config or {}).items() if k in data})

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        if len(found) != 1:
            raise KeyError(f"rendered manifests hold {len(found)} {kind}/{name}")
        return found[0]

    def container(self, kind: str, name: str) -> dict[str, Any]:
        return self.get(kind, name)["spec"]["template"]["spec"]["containers"][0]

    def _ref(self, store: dict[str, dict[str, str]], ref: dict[str, str], what: str) -> str:
        try:
            return store[ref["name"]][ref["key"]]
        except KeyError:
            raise KeyError(f"{what} {ref['name']} has no key {ref['key']}") from None

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.get("envFrom", []):
            if "secretRef" in src:
                env.update(self.secrets[src["secretRef"]["name"]])
            else:
                env.update(self.configmaps[src["configMapRef"]["name"]])
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            elif "secretKeyRef" in var["valueFrom"]:
                env[var["name"]] = self._ref(self.secrets, var["valueFrom"]["secretKeyRef"], "secret")
            else:
                env[var["name"]] = self._ref(self.configmaps, var["valueFrom"]["configMapKeyRef"], "configmap")
        return env

    def argv(self, container: dict[str, Any], env: dict[str, str]) -> list[str]:
        return [expand(a, env) for a in container.get("command", []) + container.get("args", [])]


# ---- processes ----

def stop_group(pgid: int, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a process group and wait until it is gone (SIGKILL after ``timeout``)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our child: a zombie still counts as a member
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered:\n"
                               f"{log.read_text(errors='replace')[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")
        time.sleep(0.5)


def postgres_bindir() -> Path:
    """Debian's server binaries (initdb/pg_ctl are not on PATH there); the newest installed version."""
    bindirs = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if (p.parent / "initdb").exists()]
    found = sorted(bindirs, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        found = [Path(p).parent for p in [shutil.which("pg_ctl")] if p and shutil.which("initdb")]
    if not found:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    return found[-1]


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds credentials)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text, encoding="utf-8")


def _open_to_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


class Stack:
    """PostgreSQL + SeaweedFS S3 + the bucket + MLflow, started from the rendered dev overlay under ``root``.

    ``start()`` returns once PostgreSQL and S3 answer and the bucket exists; MLflow takes ~30 s to come up on
    busy cores, so it is started without waiting: ``url`` waits for it.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.state_file = self.root / "state.json"
        self.state: dict[str, Any] = {}
        self._mlflow: subprocess.Popen | None = None

    # -- what clients use --

    @property
    def url(self) -> str:
        """The MLflow server's address, once /health answers."""
        url = self.state["mlflow_url"]
        if not self.state.get("mlflow_ready"):
            wait_http(url + "/health", 300, self._mlflow, self.root / "mlflow.log")
            self.state["mlflow_ready"] = True
        return url

    @property
    def client_env(self) -> dict[str, str]:
        """The pipeline's view: the keys of the finetune-s3 and finetune-mlflow secrets, with local values."""
        return dict(self.state["client_env"])

    @property
    def bucket(self) -> str:
        return self.state["bucket"]

    @property
    def postgres(self) -> dict[str, Any]:
        """psycopg2.connect(**stack.postgres) keyword arguments for MLflow's database."""
        return dict(self.state["postgres"])

    def s3(self, **credentials):
        """A boto3 S3 client on the stack (path-style addressing); the pipeline's credentials by default."""
        import boto3
        from botocore.config import Config

        env = self.client_env
        kw = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
              **credentials}
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}), **kw)

    # -- lifecycle --

    def start(self) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.state_file.exists():
            raise RuntimeError(f"a stack is already running from {self.root} (stop it first: make stack-down)")
        ports = {name: free_port() for name in ("postgres", "s3", "mlflow")}
        s3_url, mlflow_url = f"http://127.0.0.1:{ports['s3']}", f"http://127.0.0.1:{ports['mlflow']}"
        local = {"AWS_ENDPOINT_URL": s3_url, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_TRACKING_URI": mlflow_url,
                 "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(ports["postgres"])}
        m = Manifests(render("dev", {**self._secrets(), **local}), config=local)
        self.state = {"pgids": {}, "ports": ports, "mlflow_url": mlflow_url,
                      "client_env": {k: v for name in PIPELINE_SECRETS for k, v in m.secrets[name].items()}}
        try:
            self._start_postgres(m)
            self._start_s3(m)
            self._create_bucket(m)
            self._start_mlflow(m)
        except BaseException:
            self.stop()
            raise
        return self

    def _secrets(self) -> dict[str, str]:
        """Random values for the dev overlay's placeholders, kept in ``root`` so that a restarted stack opens
        the database and the data it made before."""
        path = self.root / "secrets.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        values = {k: secrets.token_hex(16) for example in (K8S / "overlays" / "dev").glob("*.env.example")
                  for k, v in read_env_file(example).items() if v == PLACEHOLDER}
        write_private(path, json.dumps(values, indent=1))
        return values

    def _save(self) -> None:
        write_private(self.state_file, json.dumps(self.state, indent=1))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        proc = subprocess.Popen(argv, env={**base, **env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        log.close()
        self.state["pgids"][name] = proc.pid
        self.state.setdefault("spawned", {})[name] = {"argv": argv, "env": env}
        self._save()
        return proc

    def kill(self, name: str) -> None:
        """Take one service down hard (outage tests); ``restart`` brings it back with the same command."""
        stop_group(self.state["pgids"][name], signal.SIGKILL)

    def restart(self, name: str) -> None:
        spec = self.state["spawned"][name]
        proc = self._spawn(name, spec["argv"], spec["env"])
        if name == "s3":
            wait_http(f"{self.state['client_env']['AWS_ENDPOINT_URL']}/healthz", 60, proc, self.root / "s3.log")

    def _start_postgres(self, m: Manifests) -> None:
        env = m.env(m.container("StatefulSet", "finetune-postgres"))
        bindir = postgres_bindir()
        as_postgres: list[str] = []
        pgroot = self.root / "postgres"
        if os.geteuid() == 0:  # the server refuses to run as root
            as_postgres = ["runuser", "-u", "postgres", "--"]
            if not _open_to_others(self.root):  # e.g. pytest's 0700 temp root: user postgres cannot get in
                pgroot = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
        pgroot.mkdir(exist_ok=True)
        if as_postgres:
            shutil.chown(pgroot, "postgres", "postgres")
        self.state["postgres_root"] = str(pgroot)
        def pg(tool: str) -> list[str]:
            return as_postgres + [str(bindir / tool)]

        self.state["postgres_cmd"] = pg("pg_ctl") + ["-D", str(pgroot / "data")]
        self.state["postgres"] = {"host": "127.0.0.1", "port": self.state["ports"]["postgres"],
                                  "user": env["POSTGRES_USER"], "password": env["POSTGRES_PASSWORD"],
                                  "dbname": env["POSTGRES_DB"]}
        self._save()

        def run(argv: list[str]) -> None:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=pgroot)
            if proc.returncode != 0:
                raise RuntimeError(f"{argv} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

        # What the postgres image's entrypoint does with POSTGRES_USER/PASSWORD/DB: a superuser with that
        # password (scram over TCP) and the database.
        fresh = not (pgroot / "data" / "PG_VERSION").exists()
        if fresh:
            pwfile = pgroot / "pwfile"
            pwfile.write_text(env["POSTGRES_PASSWORD"] + "\n", encoding="utf-8")
            pwfile.chmod(0o600)
            if as_postgres:
                shutil.chown(pwfile, "postgres", "postgres")
            try:
                run(pg("initdb") + ["-D", str(pgroot / "data"), "-U", env["POSTGRES_USER"],
                     f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                     "--no-sync", "--no-instructions"])
            finally:
                pwfile.unlink()
        port = self.state["ports"]["postgres"]
        run(self.state["postgres_cmd"] + ["-l", str(pgroot / "postgres.log"), "-w", "-t", "120", "-o",
                                          f"-c listen_addresses=127.0.0.1 -p {port} -k {pgroot}", "start"])
        if fresh:
            run(pg("createdb") + ["-h", str(pgroot), "-p", str(port), "-U", env["POSTGRES_USER"],
                 env["POSTGRES_DB"]])

    def _start_s3(self, m: Manifests) -> None:
        c = m.container("Deployment", "seaweedfs")
        env = m.env(c)
        (self.root / "s3").mkdir(exist_ok=True)
        ports = {f"-{p}": free_port() for p in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                                "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc")}
        admin = free_port()
        while admin + 10000 > 65535:  # weed's maintenance worker dials the admin port + 10000, whatever is set
            admin = free_port()
        ports.update({"-admin.port": admin, "-admin.port.grpc": admin + 10000})
        argv = with_flags(m.argv(c, env)[1:], {"-dir": self.root / "s3", "-ip.bind": "127.0.0.1",
                                                 "-s3.port": self.state["ports"]["s3"], **ports})
        proc = self._spawn("s3", [shutil.which("weed", path=str(BIN)) or "weed", *argv], env)
        wait_http(f"{self.state['client_env']['AWS_ENDPOINT_URL']}/healthz", 60, proc, self.root / "s3.log")

    def _create_bucket(self, m: Manifests) -> None:
        """Run the bucket Job's own script (retried like the Job: S3 may answer before its filer is ready)."""
        c = m.container("Job", "finetune-bucket")
        env = m.env(c)
        argv = [sys.executable, *m.argv(c, env)[1:]]
        for attempt in range(20):
            proc = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the bucket job failed: {proc.stderr[-2000:]}")
        self.state["bucket"] = env["S3_BUCKET"]
        self._save()

    def _start_mlflow(self, m: Manifests) -> None:
        c = m.container("Deployment", "mlflow")
        env = m.env(c)
        argv = with_flags(m.argv(c, env), {"--host": "127.0.0.1", "--port": self.state["ports"]["mlflow"],
                                           "--workers": 1})
        self._mlflow = self._spawn("mlflow", [str(BIN / "mlflow"), *argv[1:]], env)

    def stop(self) -> None:
        """Stop everything this stack started (MLflow first, PostgreSQL last) and forget it."""
        if not self.state and self.state_file.exists():
            self.state = json.loads(self.state_file.read_text(encoding="utf-8"))
        pgids = self.state.get("pgids", {})
        for name in ("mlflow", "s3"):
            if name in pgids:
                stop_group(pgids[name])
        if "postgres_cmd" in self.state:
            subprocess.run(self.state["postgres_cmd"] + ["-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, timeout=90, cwd="/")
            pgroot = Path(self.state["postgres_root"])
            if not pgroot.is_relative_to(self.root):
                shutil.rmtree(pgroot, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.state = {}

    @classmethod
    def load(cls, root: Path) -> Stack:
        stack = cls(root)
        stack.state = json.loads(stack.state_file.read_text(encoding="utf-8"))
        return stack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down"):
        sub.add_parser(name).add_argument("--root", type=Path, default=REPO / ".stack")
    sub.add_parser("env-files").add_argument("overlay", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "env-files":
        for path in write_env_files(args.overlay):
            print(f"wrote {path} (keep it out of git)")
        return 0
    if args.cmd == "down":
        if not (args.root / "state.json").exists():
            print(f"no stack running from {args.root}")
            return 0
        Stack.load(args.root).stop()
        print(f"stack in {args.root} stopped")
        return 0
    try:
        stack = Stack(args.root).start()
    except RuntimeError as exc:
        print(f"stack-up: {exc}", file=sys.stderr)
        return 1
    print(f"waiting for MLflow at {stack.state['mlflow_url']} (about 30 s)...", flush=True)
    stack.url
    stack._save()
    exports = {**stack.client_env}
    env_file = args.root / "env"
    write_private(env_file, "".join(f"export {k}={v}\n" for k, v in exports.items()))
    print(f"\nStack up (logs and data in {args.root}; stop it with `make stack-down`):\n"
          f"  MLflow     {stack.url}   (PostgreSQL backend, artifacts in s3://{stack.bucket}/mlflow-artifacts)\n"
          f"  S3         {exports['AWS_ENDPOINT_URL']}   bucket {stack.bucket}\n"
          f"  PostgreSQL 127.0.0.1:{stack.postgres['port']}   database {stack.postgres['dbname']}\n\n"
          "Point `make run` (and `dvc`, `mlflow`, boto3) at it:\n\n"
          + "".join(f"  export {k}={v}\n" for k, v in exports.items())
          + f"\nor: source {env_file} && make run\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
