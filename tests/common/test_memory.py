"""Peak memory of a step: the kernel's high-water mark, reset before it, so an earlier larger peak is not counted."""

import numpy as np

from finetune.common.memory import peak_rss_growth


def test_peak_growth_sees_a_freed_allocation_and_not_an_earlier_peak():
    big = np.ones(40 * 2**20 // 8)  # 40 MiB touched, then freed: a peak that RSS after the step no longer shows
    del big
    with peak_rss_growth() as small:
        np.ones(2**20 // 8)  # 1 MiB
    with peak_rss_growth() as peak:
        block = np.ones(24 * 2**20 // 8)
        del block
    assert small["mb"] is not None and small["mb"] < 10  # the 40 MiB before the step is not this step's
    assert 22 <= peak["mb"] < 40
