"""Data parallelism for the trainers: ``torchrun --nproc_per_node N -m r1x.cli <stage> ...``.

:class:`World` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), starts
the process group (NCCL when every rank of the node has a GPU of its own, else gloo on the CPU), wraps the model in
``DistributedDataParallel`` and gives each rank its share of the prompts. A single process is a
world of one: nothing is wrapped and the collectives return their input. (With a trainer's
``parallel`` config the model is sharded by :func:`r1x.parallel.parallelize` instead of wrapped,
and a single process gets a process group of one.)
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as tdist

__all__ = ["World"]


@dataclasses.dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    use_cuda: bool = dataclasses.field(default_factory=torch.cuda.is_available)

    @staticmethod
    def cuda_fits() -> bool:
        """Whether every rank on this node can have a GPU of its own (NCCL, one device per rank).
        With more ranks than visible GPUs (two processes on a one-GPU machine) every rank runs on
        the CPU with gloo instead of failing with "invalid device ordinal"."""
        if not torch.cuda.is_available():
            return False
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        return local <= torch.cuda.device_count()

    @classmethod
    def from_env(cls, need_group: bool = False) -> "World":
        """This process's world; with ``need_group`` a single process (no torchrun) gets a
        process group of one too (FSDP2 needs one), on its GPU when it has one."""
        n = int(os.environ.get("WORLD_SIZE", "1"))
        if n <= 1:
            if not need_group:
                return cls()
            if tdist.is_initialized():
                return cls(use_cuda=tdist.get_backend() == "nccl")
            use_cuda = torch.cuda.is_available()
            tdist.init_process_group("nccl" if use_cuda else "gloo", store=tdist.HashStore(), rank=0, world_size=1)
            return cls(use_cuda=use_cuda)
        if tdist.is_initialized():
            use_cuda = tdist.get_backend() == "nccl"
        else:
            use_cuda = cls.cuda_fits()
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            elif torch.cuda.is_available() and int(os.environ.get("RANK", "0")) == 0:
                print(f"r1x: {os.environ.get('LOCAL_WORLD_SIZE', n)} ranks on this node but "
                      f"{torch.cuda.device_count()} visible GPU(s): every rank runs on the CPU (gloo)", flush=True)
            tdist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), use_cuda)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if not self.use_cuda:
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank) if self.distributed else torch.device("cuda")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` in a world of many, else ``model``. Unused
        parameters are allowed (experts no token picked; MTP modules in stages that don't
        train them)."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def close(self) -> None:
        """Wait for the other ranks, then end the process group: a process that exits with it
        alive can abort in gloo's teardown ("terminate called without an active exception")."""
        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def shard(self, items: list) -> list:
        """This rank's share: items ``rank, rank + world_size, ...``."""
        return items[self.rank:: self.world_size] if self.distributed else items

    def all_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (same keys on every rank)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        tdist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def all_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        tdist.all_reduce(t)
        return float(t.item())

    def all_gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out
