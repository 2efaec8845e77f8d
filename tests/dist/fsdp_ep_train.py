"""Run under torchrun (gloo, CPU), by tests/test_parallel.py: r1x.parallel.parallelize (FSDP2 +
expert parallelism) trains the tiny model for a few AdamW steps on the global batch split over
the ranks, against single-process training on the whole global batch (computed on every rank
from the same seed): the same losses and the same weights, to fp32 rounding."""

import copy
import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
from r1x.parallel import clip_grad_norm_, parallelize


def full(p):
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def main():
    ep = int(sys.argv[1])
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = DeepSeekConfig.preset("tiny", bias_update_speed=0.01, aux_loss_alpha=0.01)
    ref = DeepSeekForCausalLM(cfg).train()
    model = copy.deepcopy(ref)
    total_dense = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    parallelize(model, ep=ep)
    local_dense = sum(p.to_local().numel() for name, p in model.named_parameters()
                      if ".experts." not in name and isinstance(p, DTensor))
    assert local_dense <= total_dense // n + 64 * len(list(model.parameters())), (local_dense, total_dense)

    # SGD with momentum: an update proportional to the gradient shows a wrong gradient scale
    # (AdamW would hide one: it is invariant to it)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_params = dict(ref.named_parameters())
    local = cfg.n_routed_experts // ep
    r_ep = rank % ep

    def compare(what, get, tol):
        worst = 0.0
        for name, p in model.named_parameters():
            got, want = get(p), get(ref_params[name])
            if ".experts." in name and ep > 1:
                want = want[r_ep * local : (r_ep + 1) * local]
            worst = max(worst, (got - want).abs().max().item())
            if not torch.allclose(got, want, rtol=tol, atol=tol):
                raise AssertionError(f"rank {rank}: {what} of {name} differs by {(got - want).abs().max().item():.3g}")
        return worst

    g = torch.Generator().manual_seed(1)
    per_rank, seq = 2, 12
    for step in range(3):
        ids = torch.randint(0, 256, (n * per_rank, seq), generator=g)
        loss_ref = ref(ids, labels=ids).loss
        loss_ref.backward()
        mine = ids[rank * per_rank : (rank + 1) * per_rank]
        loss = model(mine, labels=mine).loss
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= n
        if not torch.allclose(mean, loss_ref.detach(), rtol=1e-5, atol=1e-6):
            raise AssertionError(f"rank {rank} step {step}: loss {mean.item():.7f} vs {loss_ref.item():.7f}")
        compare(f"step {step} gradient", lambda p: full(p.grad), 1e-5)
        # clipping over the whole sharded model: torch's norm and scale on the reference
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        norm = clip_grad_norm_(model, 0.5)
        if not torch.allclose(norm, norm_ref.float(), rtol=1e-5):
            raise AssertionError(f"rank {rank} step {step}: grad norm {norm.item()} vs {norm_ref.item()}")
        compare(f"step {step} clipped gradient", lambda p: full(p.grad), 1e-5)
        for o in (opt, opt_ref):
            o.step()
            o.zero_grad()

    worst = compare("weight", full, 2e-5)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        if "e_score_correction_bias" in name and not torch.equal(b, b_ref):
            raise AssertionError(f"rank {rank}: {name} differs")
    print(f"FSDP2+EP OK rank {rank} of {n} ep {ep} worst {worst:.2e} dense {local_dense}/{total_dense}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    gc.collect()  # cycles (FSDP state, gloo work objects) freed before interpreter shutdown, not during it
