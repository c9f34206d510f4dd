"""An ONNX Runtime session that spreads a batch's rows over single-threaded calls instead of one call spread over
threads: what compress measures and what the ONNX pyfunc models serve with.

Why: one call on 2 intra-op threads hands every operator's work to the second thread and waits for it. On the
2-core VMs measured here (docs/benchmarks.md) that hand-over is cheap at times and costly at others: the same
int8 student at batch 32 ran 557 or 400 texts/s, and one text 1.2 or 2.1 ms, depending on the minute, while
PyTorch fp32 held steady. Two single-threaded calls on half the rows each never wait on each other: 582 texts/s
in both states; one text on one thread takes 1.7 ms.

SELF-CONTAINED (numpy and onnxruntime only, no finetune import): the registry logs this file beside the ONNX
pyfunc models (MLflow ``code_paths``), which import it as ``row_parallel`` where finetune is not installed.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort


def available_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may use: the cgroup's CPU quota when one is set (a container's limit; os.cpu_count()
    reports the host's), else the CPUs it may be scheduled on."""
    try:
        with open(cpu_max, encoding="utf-8") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RowParallelSession:
    """``threads`` (0: available_cpus()) single-threaded calls at once, each on a contiguous slice of the batch's
    rows; the outputs concatenated in row order, so per-token outputs (batch, sequence, tags) keep their shape."""

    def __init__(self, path: str, threads: int = 0, output: str = "logits"):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.output = output
        self.threads = threads or available_cpus()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="onnx-rows") if self.threads > 1 else None

    def _call(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], feed)[0]  # run() is thread-safe and releases the GIL

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(next(iter(feed.values())))
        if self.pool is None or rows < 2:
            return self._call(feed)
        slices = np.array_split(np.arange(rows), min(self.threads, rows))
        parts = self.pool.map(lambda idx: self._call({k: v[idx[0]:idx[-1] + 1] for k, v in feed.items()}), slices)
        return np.concatenate(list(parts))
