"""An ONNX Runtime session that runs a batch as single-threaded calls at once, one per group of rows of similar
length, each cut to its own longest row: what compress measures and what the ONNX pyfunc models serve with.

Why not one call on 2 intra-op threads: that call hands every operator's work to the second thread and waits for
it. On the 2-core VMs measured here (docs/benchmarks.md) the hand-over is cheap at times and costly at others: the
int8 4-layer student at batch 32 ran 557 or 400 texts/s, and one text 1.2 or 2.1 ms, depending on the minute. Two
single-threaded calls never wait on each other (one text on one thread: 1.7 ms, steady). Why groups by length: a
batch in arrival order pads every row to its longest (reviews differ 5x in length); two calls on the longer and
the shorter rows, each cut to its own longest, do about half the work: the same student 860 texts/s against 585
for two calls on halves in arrival order, on the same machine minutes apart.

SELF-CONTAINED (numpy and onnxruntime only, no finetune import): the registry logs this file beside the ONNX
pyfunc models (MLflow ``code_paths``), which import it as ``row_parallel`` where finetune is not installed.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import onnxruntime as ort


def cpu_quota(cgroup: str = "/sys/fs/cgroup") -> int | None:
    """The container's CPU limit, rounded up (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``); None when unset."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            with open(os.path.join(cgroup, quota_file), encoding="utf-8") as fh:
                fields = fh.read().split()
            if period_file:
                with open(os.path.join(cgroup, period_file), encoding="utf-8") as fh:
                    fields.append(fh.read().strip())
            quota, period = fields[0], fields[-1]
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def available_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the container's CPU limit when one is set (os.cpu_count() reports the host's),
    else the CPUs it may be scheduled on."""
    schedulable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota(cgroup)
    return min(quota, schedulable) if quota else schedulable


def balanced_groups(lengths: np.ndarray, groups: int) -> list[np.ndarray]:
    """Row indices in at most ``groups`` groups of similar lengths (longest first), chosen so that the largest
    group's padded size (rows x its longest row) is as small as it can be for contiguous runs of the rows sorted by
    length: the calls then finish together and pad little."""
    order = np.argsort(-lengths, kind="stable")
    ordered = lengths[order]

    def cut(cap: int) -> list[int]:  # greedy: each group takes rows while rows x its longest (its first) <= cap
        starts, first = [0], 0
        for i in range(1, len(ordered)):
            if (i - first + 1) * ordered[first] > cap:
                starts.append(i)
                first = i
        return starts

    lo, hi = int(ordered[0]), int(ordered[0]) * len(ordered)
    while lo < hi:  # the smallest cap that needs at most `groups` groups
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(cut(mid)) <= groups else (mid + 1, hi)
    bounds = cut(lo) + [len(ordered)]
    return [order[a:b] for a, b in pairwise(bounds)]


class RowParallelSession:
    """``threads`` (0: available_cpus()) single-threaded calls at once, each on a group of the batch's rows of
    similar length, cut to that group's longest row (``attention_mask`` columns that are padding in every row of
    the group); the outputs put back in row order and, per-token outputs (batch, sequence, tags), padded back with
    zeros to the batch's width."""

    def __init__(self, path: str, threads: int = 0, output: str = "logits"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.output = output
        self.threads = threads or available_cpus()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="onnx-rows") if self.threads > 1 else None

    def _call(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feed)[0]  # thread-safe; releases the GIL

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return run_grouped(feed, self._call, self.threads, self.pool)


def run_grouped(feed: dict[str, np.ndarray], call, threads: int, pool: ThreadPoolExecutor | None) -> np.ndarray:
    """``call`` (a feed -> outputs) on at most ``threads`` length groups of the feed's rows at once on ``pool``,
    each group cut to its longest row; the outputs in row order, per-token ones padded back to the batch's width."""
    mask = feed["attention_mask"]

    def cut(rows: np.ndarray) -> np.ndarray:
        used = np.flatnonzero(mask[rows].any(axis=0))
        width = int(used[-1]) + 1 if len(used) else mask.shape[1]  # trailing all-padding columns dropped
        return call({k: v[rows, :width] for k, v in feed.items()})

    n = min(threads, len(mask)) if pool else 1
    groups = balanced_groups(mask.sum(axis=1), n) if n > 1 else [np.arange(len(mask))]
    parts = list(pool.map(cut, groups)) if len(groups) > 1 else [cut(groups[0])]
    first = parts[0]
    width = (mask.shape[1],) if first.ndim == 3 else ()  # per token (batch, sequence, tags): the batch's width
    out = np.zeros((len(mask), *width, *first.shape[1 + len(width):]), dtype=first.dtype)
    for rows, part in zip(groups, parts):
        out[rows, :part.shape[1]] = part
    return out
