"""The CPU kernels run on torch's intra-op threads (not a timing test).

`at::parallel_for` is header code: an extension built without OpenMP runs every
parallel region on one thread whatever torch.get_num_threads() says. The
library's own probe counts the OS threads that ran a region.
"""
import torch

import dspark_ops


def test_built_with_openmp():
    assert dspark_ops.build_info()["openmp"], "the extension was compiled without OpenMP"


def test_parallel_region_follows_torch_threads():
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert dspark_ops.build_info()["cpu_threads"] == n
    finally:
        torch.set_num_threads(before)
