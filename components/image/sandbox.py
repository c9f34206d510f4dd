"""Run a command inside the image's root file system the way a pod runs it, without a container runtime.

What it isolates: its own mount, PID, IPC and UTS namespaces; the image mounted read-only (nosuid, nodev), a fresh
/proc, a minimal /dev (null, zero, full, random, urandom, tty, shm), a writable tmpfs on /tmp (the cluster's
emptyDir), host folders bound only where asked (under /tmp); the image's environment only (`env -i`), its
working directory, its user (uid/gid 10001, no supplementary groups, no capabilities, no_new_privs); optionally a
network namespace (see netns.py) whose only reachable address is one forwarded port.
What it does not: no cgroup limits (CPU/memory requests are not enforced), no seccomp profile, no user
namespace (uid 10001 is the host's uid 10001).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

SETUP = r"""
set -e
R="$1"; ROOTFS="$2"; WORKDIR="$3"; USERSPEC="$4"; NBINDS="$5"; shift 5
mount --bind "$ROOTFS" "$R"
mount -o remount,bind,ro,nosuid,nodev "$R"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/tmp"
mount -t tmpfs -o nosuid,noexec,mode=755 tmpfs "$R/dev"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
mkdir "$R/dev/shm" && mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"; ln -s fd/0 "$R/dev/stdin"; ln -s fd/1 "$R/dev/stdout"; ln -s fd/2 "$R/dev/stderr"
i=0
while [ "$i" -lt "$NBINDS" ]; do
    mkdir -p "$R$2"; mount --bind "$1" "$R$2"; shift 2; i=$((i + 1))
done
uid="${USERSPEC%%:*}"; gid="${USERSPEC#*:}"
exec chroot "$R" setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs --inh-caps=-all \
    --bounding-set=-all env -i -C "$WORKDIR" "$@"
"""


def run(rootfs: Path, config: dict, argv: list[str], env: dict[str, str] | None = None,
        binds: dict[str, str] | None = None, netns: str | None = None, timeout: float = 1800,
        ) -> subprocess.CompletedProcess:
    """Run ``argv`` in the image at ``rootfs`` with the image config's Env (plus ``env``), User and WorkingDir.
    ``binds`` maps host folders to paths under /tmp in the sandbox (writable); ``netns`` names a network
    namespace (`ip netns`) to run in instead of the host's."""
    binds = binds or {}
    for target in binds.values():
        if not target.startswith("/tmp/"):
            raise ValueError(f"bind target {target!r}: only paths under /tmp are writable in the image")
    variables = [*config["Env"], *(f"{k}={v}" for k, v in (env or {}).items())]
    pairs = [p for host, target in binds.items() for p in (host, target)]
    with tempfile.TemporaryDirectory(prefix="image-root-") as mnt:
        cmd = ["unshare", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
               "sh", "-c", SETUP, "setup", mnt, str(rootfs), config.get("WorkingDir") or "/",
               config.get("User") or "0:0", str(len(binds)), *pairs, *variables, *argv]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
