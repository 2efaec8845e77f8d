"""Expert parallelism (r1x.parallel.expert_parallel) on the CPU with gloo, under torchrun with 2
and 4 processes: forward and backward equal the full layer on the same weights and tokens."""

import re
from pathlib import Path

import pytest
import torch

import r1x
from r1x.nn import MoE
from r1x.parallel import expert_parallel
from r1x.testing import torchrun

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
SCRIPT = Path(__file__).parent / "dist" / "ep_moe.py"


@needs_gloo
@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_equals_the_full_layer(tmp_path, nproc):
    out = torchrun([str(SCRIPT)], cwd=tmp_path, nproc=nproc, timeout=300)
    # ranks print concurrently: their lines may run together
    assert sorted(re.findall(r"EP OK rank \d+ of \d+", out)) == [f"EP OK rank {r} of {nproc}" for r in range(nproc)]


def test_expert_parallel_bad_input():
    with pytest.raises(TypeError, match="r1x.nn.MoE"):
        expert_parallel(torch.nn.Linear(2, 2))
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            expert_parallel(MoE(16, 8, 4, 2))


def test_single_rank_layer_is_untouched():
    moe = MoE(16, 8, 4, 2)
    assert moe.ep_group is None and moe.ep_size == 1 and "expert_parallel" not in repr(moe)
    assert r1x.parallel.expert_parallel is expert_parallel
