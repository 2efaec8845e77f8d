"""Run by tests/test_parallel.py, under torchrun (gloo, CPU) or as one plain process:
``save PATH EP``: the tiny model under parallelize(ep=EP) trains two SGD steps, saves a DCP
checkpoint and writes its eval loss on a fixed batch to PATH.loss;
``load PATH EP``: a differently initialised model (parallelized when under torchrun) loads the
checkpoint and must give that eval loss, then one more SGD step must give the loss the saving
run gets after the same step (written by ``save`` to PATH.next)."""

import copy
import gc
import os
import sys

import torch
import torch.distributed as dist

from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
from r1x.parallel import load_checkpoint, parallelize, save_checkpoint


def batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (4, 10), generator=g) for _ in range(4)]


def eval_loss(model, ids):
    model.eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    model.train()
    return loss


def sgd_step(model, opt, ids, rank, n):
    mine = ids[rank * len(ids) // n : (rank + 1) * len(ids) // n]
    model(mine, labels=mine).loss.backward()
    opt.step()
    opt.zero_grad()


def main():
    mode, path, ep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, n = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    cfg = DeepSeekConfig.preset("tiny", bias_update_speed=0.01)
    torch.manual_seed(0 if mode == "save" else 123)
    model = DeepSeekForCausalLM(cfg).train()
    if distributed:
        parallelize(model, ep=ep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no state: a weights-only checkpoint resumes exactly
    data = batches()
    if mode == "save":
        for ids in data[:2]:
            sgd_step(model, opt, ids, rank, n)
        save_checkpoint(model, path)
        loss = eval_loss(model, data[3])
        sgd_step(model, opt, data[2], rank, n)
        nxt = eval_loss(model, data[3])
        if rank == 0:
            with open(path + ".loss", "w") as f:
                f.write(f"{loss!r} {nxt!r}")
    else:
        with open(path + ".loss") as f:
            want, want_next = (float(v) for v in f.read().split())
        load_checkpoint(model, path)
        got = eval_loss(model, data[3])
        assert abs(got - want) <= 1e-6 * abs(want), f"rank {rank}: loaded eval loss {got!r}, saved {want!r}"
        sgd_step(model, opt, data[2], rank, n)
        got_next = eval_loss(model, data[3])
        assert abs(got_next - want_next) <= 1e-5 * abs(want_next), \
            f"rank {rank}: resumed loss {got_next!r}, uninterrupted {want_next!r}"
        # a checkpoint of another config: a clear error, nothing loaded
        other = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny", hidden_size=32, moe_intermediate_size=16))
        try:
            load_checkpoint(other, path)
        except ValueError as e:
            assert "not a checkpoint of this model" in str(e), e
        else:
            raise AssertionError("a checkpoint of another config was loaded")
    print(f"DCP {mode} OK rank {rank} of {n} ep {ep}", flush=True)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    gc.collect()  # cycles (FSDP state, gloo work objects) freed before interpreter shutdown, not during it
