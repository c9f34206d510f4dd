"""Build the project image from components/Dockerfile without a container runtime (none can run containers on
this kind of machine: crun/runc may not set rlimits here, and no registry is reachable).

The base is a Debian root file system made with debootstrap; the Dockerfile's ENV/COPY/RUN/WORKDIR/USER/CMD are
then applied to it, RUN in a chroot inside a private mount namespace. The result is a root file system folder
(what the sandbox runs, components/image/sandbox.py) and an OCI image archive (one layer) that `podman load`,
`skopeo copy oci-archive:...` or any registry push understands. Both land in build/image/<tag>-<inputs hash>/
and are reused while the recipe, pyproject.toml, params.yaml, src/ and the build args are unchanged.

    python components/image/build.py                                    # the CPU variant (make image)
    python components/image/build.py --tag gpu --build-arg TORCH=torch==2.13.0
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "components" / "Dockerfile"
OUT = REPO / "build" / "image"
SUITE = "bookworm"
# Debian's Python 3.11 and the CA bundle go into the base, so the RUN step needs no apt-get update
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
# What the image is made from, hashed to reuse a build. README.md (copied only as the package's long description)
# is left out so that editing docs does not rebuild; this file is represented by BUILDER_VERSION: bump it when a
# change here changes what is built.
RECIPE_FILES = ("components/Dockerfile", "components/image/install.sh", "pyproject.toml", "params.yaml")
BUILDER_VERSION = "2"
PIP_CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "~/.config/pip/pip.conf", "~/.pip/pip.conf")


class BuildError(RuntimeError):
    pass


@dataclass
class Recipe:
    """What the Dockerfile says, with its build args resolved."""

    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[str, list[str] | str]] = field(default_factory=list)  # ("COPY", [src..., dest]) / ("RUN", cmd)
    workdir: str = "/"
    user: str = "0"
    cmd: list[str] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per logical line: comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def parse_dockerfile(text: str, build_args: dict[str, str] | None = None) -> Recipe:
    """The subset of Dockerfile syntax the recipe uses; anything else is refused rather than ignored."""
    given = dict(build_args or {})
    recipe = Recipe()

    def expand(value: str) -> str:
        scope = {**recipe.args, **recipe.env}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), ""), value)

    for word, rest in _instructions(text):
        if word == "ARG":
            name, has_default, default = rest.partition("=")
            recipe.args[name] = given.get(name, default if has_default else recipe.args.get(name, ""))
        elif word == "FROM":
            continue  # the base is the debootstrap root file system (the BASE arg's default names its import)
        elif word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                if not sep:
                    raise BuildError(f"{DOCKERFILE}: ENV {item!r}: only the KEY=VALUE form is supported")
                recipe.env[key] = expand(value)
        elif word == "COPY":
            recipe.steps.append(("COPY", shlex.split(rest)))
        elif word == "RUN":
            recipe.steps.append(("RUN", rest))
        elif word == "WORKDIR":
            recipe.workdir = expand(rest)
        elif word == "USER":
            recipe.user = expand(rest)
        elif word == "CMD":
            recipe.cmd = json.loads(rest)
        else:
            raise BuildError(f"{DOCKERFILE}: instruction {word} is not supported by {Path(__file__).name}")
    unknown = sorted(set(given) - set(recipe.args))
    if unknown:
        raise BuildError(f"{DOCKERFILE}: no ARG named {', '.join(unknown)}")
    return recipe


def inputs_hash(build_args: dict[str, str]) -> str:
    """Content hash of what goes into the image: recipe, package metadata, src/, build args, builder version."""
    h = hashlib.sha256(json.dumps([BUILDER_VERSION, sorted(build_args.items())]).encode())
    files = [REPO / f for f in RECIPE_FILES]
    files += sorted(p for p in (REPO / "src").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (one-line or deb822 sources), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for src in sources:
        text = src.read_text() if src.is_file() else ""
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.M):
            return m.group(1)
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs(out: Path = OUT) -> Path:
    """Debian minbase + Python, made once per machine (debootstrap, about half a minute) and reused."""
    base = out / f"base-{SUITE}"
    if (base / "done").is_file():
        return base / "rootfs"
    if not shutil.which("debootstrap"):
        raise BuildError("debootstrap is not installed: apt-get install -y debootstrap")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    # its own mount namespace: debootstrap's /proc and /sys mounts must not outlive it
    _check(["unshare", "--mount", "--fork", "debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
            SUITE, str(base / "rootfs"), debian_mirror()], "debootstrap")
    (base / "done").write_text(debian_mirror() + "\n")
    return base / "rootfs"


def _check(argv: list[str], what: str, **kw) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _pip_settings() -> tuple[str, dict[str, str], list[str]]:
    """The host's pip configuration for the build only (its indexes and wheel folders are what this machine can
    reach): merged config text, PIP_* variables, and the local files and folders it names (bound read-only)."""
    cfg = configparser.ConfigParser()
    cfg.read([os.path.expanduser(p) for p in PIP_CONFIG_FILES])
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"}
    values = [v for s in cfg.sections() for v in cfg[s].values()] + list(env.values())
    paths = set()
    for token in " ".join(values).split():
        path = token[len("file://"):] if token.startswith("file://") else token
        if token.startswith("file://") and Path(path).name == "simple":
            path = str(Path(path).parent)  # a local index's pages link to files beside simple/
        if path.startswith("/") and Path(path).exists():
            paths.add(path.rstrip("/") or "/")
    text = io.StringIO()
    cfg.write(text)
    return text.getvalue(), env, sorted(paths)


RUN_SCRIPT = r"""
set -e
R="$1"; shift
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
for d in "$@"; do mount --bind -o ro "$d" "$R$d"; done
exec chroot "$R" /bin/sh -ec "$RUN_CMD"
"""


def _run_step(rootfs: Path, cmd: str, env: dict[str, str], ro_paths: list[str]) -> None:
    """One RUN instruction: chroot into the root file system in a private mount and PID namespace, with /proc, /dev
    and the host's pip files and wheel folders mounted only for its duration (mount points made here go again)."""
    created = []
    for d in ro_paths:
        target = rootfs / d.lstrip("/")
        created += [p for p in [target, *target.parents] if not p.exists() and rootfs in p.parents]
        if Path(d).is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    try:
        _check(["unshare", "--mount", "--pid", "--fork", "sh", "-c", RUN_SCRIPT, "run", str(rootfs), *ro_paths],
               f"RUN {cmd}", env={**env, "RUN_CMD": cmd, "PATH": env.get("PATH", os.defpath)})
    finally:
        for p in sorted(created, key=lambda p: len(p.parts), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()


def _copy(sources: list[str], dest: str, rootfs: Path) -> None:
    target = rootfs / dest.lstrip("/")
    for src in sources:
        path = REPO / src
        if path.is_dir():
            shutil.copytree(path, target if len(sources) == 1 and not dest.endswith("/") else target / path.name,
                            ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.name if dest.endswith("/") else target)


def _apply(recipe: Recipe, rootfs: Path) -> None:
    pip_conf, pip_env, ro_paths = _pip_settings()
    resolv = rootfs / "etc" / "resolv.conf"
    had_resolv = resolv.exists() or resolv.is_symlink()
    if not had_resolv and Path("/etc/resolv.conf").is_file():
        shutil.copy2("/etc/resolv.conf", resolv)  # name lookups for PyPI during the build only
    try:
        for kind, value in recipe.steps:
            if kind == "COPY":
                _copy(value[:-1], value[-1], rootfs)
                continue
            build_dir = rootfs / "tmp" / "build"
            build_dir.mkdir(parents=True, exist_ok=True)
            (build_dir / "pip.conf").write_text(pip_conf)  # removed with /tmp/build by the install step
            env = {**recipe.args, **recipe.env, **pip_env, "PIP_CONFIG_FILE": "/tmp/build/pip.conf"}
            _run_step(rootfs, value, env, ro_paths)
    finally:
        if not had_resolv:
            resolv.unlink(missing_ok=True)


def image_config(recipe: Recipe) -> dict:
    user = recipe.user if ":" in recipe.user or not recipe.user.isdigit() else f"{recipe.user}:{recipe.user}"
    return {"Env": [f"{k}={v}" for k, v in recipe.env.items()], "User": user, "WorkingDir": recipe.workdir,
            "Cmd": recipe.cmd}


def _blob(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), path.stat().st_size


def write_oci_archive(rootfs: Path, config: dict, dest: Path, ref_name: str) -> str:
    """A one-layer OCI image layout in a tar (what `podman save --format oci-archive` writes); returns the
    manifest digest, the image's `@sha256:` once pushed."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        layer = Path(tmp) / "layer.tar"
        # real mtimes: the installed .pyc files are checked against their sources' mtimes
        _check(["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(rootfs), "-cf", str(layer), "."],
               "tar of the root file system")
        layer_digest, layer_size = _blob(layer)
        image = {"architecture": "amd64", "os": "linux", "config": config,
                 "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
        blobs = {}

        def add_json(obj: dict) -> dict:
            data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            blobs[digest] = data
            return {"digest": digest, "size": len(data)}

        config_desc = add_json(image)
        manifest_desc = add_json({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                        "size": layer_size}]})
        index = {"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_desc,
            "annotations": {"org.opencontainers.image.ref.name": ref_name}}]}
        partial = dest.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                               ("index.json", json.dumps(index).encode()),
                               *((f"blobs/sha256/{d[7:]}", b) for d, b in blobs.items())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tar.add(layer, arcname=f"blobs/sha256/{layer_digest[7:]}")
        partial.replace(dest)
    return manifest_desc["digest"]


def _size(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
               .stdout.split()[0])


def build(build_args: dict[str, str] | None = None, tag: str = "cpu", out: Path = OUT) -> dict:
    """Build (or reuse) the image; returns its record (also build/image/<tag>-<hash>/image.json)."""
    if os.geteuid() != 0:
        raise BuildError("building the image needs root (debootstrap, chroot, mount namespaces)")
    build_args = dict(build_args or {})
    recipe = parse_dockerfile(DOCKERFILE.read_text(), build_args)
    digest = inputs_hash(recipe.args)
    folder = out / f"{tag}-{digest[:12]}"
    record_file = folder / "image.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    started = time.monotonic()
    base = base_rootfs(out)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rootfs = folder / "rootfs"
    _check(["cp", "-a", str(base), str(rootfs)], "copy of the base root file system")
    _apply(recipe, rootfs)
    config = image_config(recipe)
    ref = f"finetune:{tag}-{digest[:12]}"
    archive = folder / "image.oci.tar"
    manifest = write_oci_archive(rootfs, config, archive, ref)
    record = {"tag": tag, "ref": ref, "inputs_sha256": digest, "build_args": recipe.args, "config": config,
              "manifest_digest": manifest, "rootfs": str(rootfs), "oci_archive": str(archive),
              "rootfs_bytes": _size(rootfs), "oci_archive_bytes": archive.stat().st_size,
              "build_seconds": round(time.monotonic() - started, 1)}
    record_file.write_text(json.dumps(record, indent=2) + "\n")  # written last: marks a complete build
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", default="cpu", help="variant name in the output folder and the archive's ref")
    ap.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=OUT)
    ns = ap.parse_args(argv)
    try:
        args = dict(a.split("=", 1) for a in ns.build_arg)
        record = build(args, ns.tag, ns.out)
    except (BuildError, ValueError) as exc:
        print(f"image: error: {exc}", file=sys.stderr)
        return 1
    print(f"{record['oci_archive']}\n  ref {record['ref']}  manifest {record['manifest_digest']}\n"
          f"  root file system {record['rootfs_bytes'] / 1e6:.0f} MB, built in {record['build_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
