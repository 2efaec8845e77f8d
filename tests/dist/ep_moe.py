"""Run under torchrun (gloo, CPU), by tests/test_parallel.py: an expert-parallel r1x.nn.MoE against
the full layer on the same weights and the same tokens (every rank builds both from one seed and
computes the full layer on all ranks' tokens)."""

import copy
import gc

import torch
import torch.distributed as dist

from r1x.nn import MoE
from r1x.parallel import expert_parallel


def tokens(counts, h, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, generator=g) for t in counts], [torch.randn(t, h, generator=g) for t in counts]


def close(a, b, what, rank, atol=2e-5, rtol=2e-5):
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        raise AssertionError(f"rank {rank}: {what} differs by {(a - b).abs().max().item():.3g}")


def check(full: MoE, counts, seed, rank, n, tag, fp8=False):
    ep = expert_parallel(copy.deepcopy(full))
    local = full.n_routed_experts // n
    lo, hi = rank * local, (rank + 1) * local
    xs, gs = tokens(counts, full.hidden_size, seed)
    rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    if fp8:
        with torch.inference_mode():
            y_full = full(torch.cat(xs).bfloat16())
            y_ep = ep(xs[rank].bfloat16())
        close(y_ep.float(), y_full[rows].float(), f"{tag}: fp8 forward", rank, atol=1e-2, rtol=1e-2)
        return
    X = torch.cat(xs).requires_grad_()
    ids_full = full.route(X.detach())[2]
    x = xs[rank].clone().requires_grad_()
    assert torch.equal(ep.route(x.detach())[2], ids_full[rows]), f"rank {rank}: {tag}: routed ids differ"
    y_full = full(X)
    (y_full * torch.cat(gs)).sum().backward()
    y_ep = ep(x)
    (y_ep * gs[rank]).sum().backward()
    close(y_ep, y_full[rows], f"{tag}: forward", rank)
    close(x.grad, X.grad[rows], f"{tag}: grad of x", rank)
    for name in ("gate_up_proj", "down_proj"):
        close(getattr(ep.experts, name).grad, getattr(full.experts, name).grad[lo:hi], f"{tag}: grad of {name}", rank)
    # router and shared experts are replicated: their gradients sum over the ranks (what DP does)
    for (name, p_ep), (_, p_full) in zip(ep.named_parameters(), full.named_parameters()):
        if name.startswith("experts."):
            continue
        g = p_ep.grad.clone()
        dist.all_reduce(g)
        close(g, p_full.grad, f"{tag}: summed grad of {name}", rank)
    assert torch.equal(ep.gate.e_score_correction_bias, full.gate.e_score_correction_bias), f"rank {rank}: {tag}: bias"
    assert torch.equal(ep.expert_load, full.expert_load), f"rank {rank}: {tag}: expert_load"
    received = ep.expert_load[lo:hi].sum().item()
    return received


def main():
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = dict(hidden_size=48, moe_intermediate_size=40, n_routed_experts=8, num_experts_per_tok=3,
               n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               bias_update_speed=0.01, dtype=torch.float32)
    full = MoE(**cfg).train()

    # uneven token counts per rank
    check(full, [7 + 5 * r for r in range(n)], 1, rank, n, "uneven tokens")

    # one rank receives nothing (its experts are never chosen) and rank 0 sends nothing
    full2 = MoE(**cfg).train()
    with torch.no_grad():
        local = 8 // n
        full2.gate.e_score_correction_bias[(n - 1) * local :] = -1e4
    received = check(full2, [0] + [9] * (n - 1), 2, rank, n, "empty rank")
    if rank == n - 1:
        assert received == 0, f"rank {rank}: expected no tokens, got {received}"

    # FP8 experts (inference), bf16 activations
    full3 = MoE(**{**cfg, "hidden_size": 128, "dtype": torch.bfloat16}).eval().to_fp8()
    check(full3, [6 + r for r in range(n)], 3, rank, n, "fp8", fp8=True)

    # E not divisible by the group's size
    try:
        expert_parallel(MoE(**{**cfg, "n_routed_experts": 6, "n_group": 1, "topk_group": 1}) if n == 4
                        else MoE(**{**cfg, "n_routed_experts": 5, "n_group": 1, "topk_group": 1}))
    except ValueError as e:
        assert "must divide `n_routed_experts`" in str(e), e
    else:
        raise AssertionError("expert_parallel accepted E not divisible by the group's size")
    print(f"EP OK rank {rank} of {n}", flush=True)
    dist.barrier()  # every rank done before the group ends (gloo aborts at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    gc.collect()  # cycles (FSDP state, gloo work objects) freed before interpreter shutdown, not during it
