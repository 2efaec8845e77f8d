"""Scaling out on torch.distributed: expert parallelism for :class:`r1x.nn.MoE`, FSDP2 + EP for
the whole model (:func:`parallelize`) and checkpoints that reshard (:func:`save_checkpoint`,
:func:`load_checkpoint`).

``expert_parallel(moe, group)`` shards a full MoE layer's routed experts over the ``n`` ranks of a
process group, in place: rank ``r`` keeps experts ``r*E/n .. (r+1)*E/n - 1``; the router and the
shared experts stay whole on every rank. Each rank then runs the layer on its own tokens:

1. route (the full router: every rank knows every expert's score);
2. group its token copies by expert with :func:`r1x.moe_dispatch` (rows sorted by expert, so the
   rows for rank ``j``'s experts are one contiguous block);
3. exchange the per-expert counts (an ``all_to_all_single`` of ``E`` int32 values), then the rows
   themselves (``all_to_all_single`` with those counts as split sizes; its backward is the
   reverse all-to-all);
4. regroup the received rows by local expert (they arrive by source rank) and run the local
   experts with the grouped GEMMs;
5. send the results back the way they came and combine them with the routing weights.

Every rank computes on its tokens what the full layer computes on them, forward and backward:
the gradient of a local expert sums over the tokens every rank sent it. The per-expert load is
all-reduced over the group before the aux-loss-free bias update, so every rank keeps the same
bias and the same :attr:`~r1x.nn.MoE.expert_load`. The FP8 experts (inference) shard the same way.

What it costs: each token copy crosses the group twice (there and back), ``H`` values each way
in the activations' dtype, so a layer moves ``2 * top_k * H * bytes`` per token (DeepSeek-V3:
2 x 8 x 7168 x 2 B = 229 KB per token per layer in bf16), plus two small count exchanges; the
splits are read on the host (one device synchronisation per layer).
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["expert_parallel", "parallelize", "clip_grad_norm_", "save_checkpoint", "load_checkpoint",
           "iter_full_tensors", "global_view", "global_state_dict"]


def expert_parallel(moe: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard ``moe``'s routed experts over ``group`` (default: the whole world), in place.

    Args:
        moe: a full :class:`r1x.nn.MoE` (the same weights on every rank, e.g. built from one
            seed or loaded from one checkpoint).
        group: the expert-parallel process group; rank ``r`` of its ``n`` keeps experts
            ``r*E/n .. (r+1)*E/n - 1``.

    Returns ``moe`` itself. Raises ``ValueError`` when ``n`` does not divide the number of
    routed experts, ``TypeError`` for anything but an :class:`r1x.nn.MoE`, and ``RuntimeError``
    without an initialised process group.
    """
    from r1x.nn.moe import MoE

    if not isinstance(moe, MoE):
        raise TypeError(f"expert_parallel: `moe` must be an r1x.nn.MoE, got {type(moe).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel: no process group: call torch.distributed.init_process_group "
                           "first (e.g. under torchrun)")
    if group is None:
        group = dist.group.WORLD
    if moe.ep_group is not None:
        raise ValueError("expert_parallel: `moe` is already expert-parallel")
    n, r = dist.get_world_size(group), dist.get_rank(group)
    e = moe.n_routed_experts
    if e % n:
        raise ValueError(f"expert_parallel: the group's size ({n}) must divide `n_routed_experts` ({e})")
    local = e // n
    lo = r * local
    ex = moe.experts
    names = ["gate_up_proj", "down_proj"]
    if ex.is_fp8:
        names += ["gate_up_proj_scale_inv", "down_proj_scale_inv"]
    with torch.no_grad():
        for name in names:
            t = getattr(ex, name)
            part = t[lo : lo + local].clone()
            if isinstance(t, nn.Parameter):
                setattr(ex, name, nn.Parameter(part, requires_grad=t.requires_grad))
            else:
                ex.register_buffer(name, part)
    ex.num_experts = local
    ex._padded = {}
    moe.ep_group, moe.ep_size, moe.ep_rank = group, n, r
    return moe


def _regroup_order(recv: torch.Tensor, total: int) -> torch.Tensor:
    """Rows received as blocks (source s, local expert j), s-major, with ``recv[s, j]`` rows each
    (``total`` in all, known on the host): the gather index that puts them j-major (all of
    expert 0 from every source, then expert 1...)."""
    n, local = recv.shape
    flat = recv.reshape(-1).long()
    start = (flat.cumsum(0) - flat).view(n, local)  # where block (s, j) starts as received
    lengths = recv.t().reshape(-1).long()  # blocks in j-major order
    out_start = lengths.cumsum(0) - lengths
    shift = torch.repeat_interleave(start.t().reshape(-1) - out_start, lengths, output_size=total)
    return torch.arange(total, device=recv.device) + shift


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` of the rows of ``x`` (autograd: the backward is the reverse exchange)."""
    if torch.is_grad_enabled() and x.requires_grad:
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def ep_experts(moe: nn.Module, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The routed experts of an expert-parallel ``moe`` on this rank's dispatched rows.

    ``xs [M, H]`` rows grouped by (global) expert, as :func:`r1x.moe_dispatch` returns them, and
    ``counts [E]`` the rows per expert. Returns ``y [M, H]``: the experts' outputs in the rows'
    order. (The load statistics are all-reduced by the layer itself.)"""
    group, n = moe.ep_group, moe.ep_size
    local = moe.n_routed_experts // n
    counts = counts.to(torch.int32)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=group)  # [n * local]: from source s, for local expert j
    recv = recv.view(n, local)
    # the split sizes on the host: one device synchronisation for both
    splits = torch.cat([counts.view(n, local).sum(1), recv.sum(1)]).tolist()
    send_splits, recv_splits = splits[:n], splits[n:]
    xr = _all_to_all(xs, recv_splits, send_splits, group)
    order = _regroup_order(recv, sum(recv_splits))
    local_offs = recv.sum(0).cumsum(0).to(torch.int32)
    y_local = moe.experts(xr.index_select(0, order), local_offs)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    return _all_to_all(y_local.index_select(0, inverse), send_splits, recv_splits, group)


def parallelize(model: nn.Module, *, ep: int = 1, dp_shard: int | None = None, mp_policy=None,
                reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 + expert parallelism for a whole :class:`r1x.model.DeepSeekForCausalLM`, in place,
    on the world of ``torch.distributed`` (torchrun), the way torchtitan composes them:

    - the routed experts of every MoE layer are sharded over EP groups of ``ep`` consecutive
      ranks (:func:`expert_parallel`), and each expert shard is in turn FSDP-sharded over the
      ``world / ep`` ranks that hold the same experts (the ``edp`` mesh dimension);
    - everything else (attention, shared experts, dense MLPs, norms, embeddings, the head, the
      MTP modules) is FSDP-sharded (``fully_shard``) over all ranks, one unit per decoder layer
      plus the root (embeddings, final norm, head, MTP modules);
    - gradients are averaged over all ranks (the experts' too: their reduce-scatter over ``edp``
      is divided by the world size, since their gradient already sums the ``ep`` ranks' tokens),
      so each rank's loss is its own batch's mean and an optimizer step equals single-process
      training on the global batch;
    - the MoE load statistics and aux-loss-free bias updates are all-reduced over all ranks.

    Args:
        model: a DeepSeekForCausalLM with the same weights on every rank (one seed or one
            checkpoint), on the device this rank computes on.
        ep: expert-parallel size; must divide the world size and ``n_routed_experts``.
        dp_shard: ranks that shard the dense parameters; must be the world size (the default).
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (torchtitan trains with
            ``param_dtype=torch.bfloat16, reduce_dtype=torch.float32``); default: none.
        reshard_after_forward: FSDP2's (True: free the gathered parameters after forward).

    Returns ``model``; ``model.r1x_mesh`` is the ``(edp, ep)`` device mesh.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from r1x.nn.moe import MoE

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("parallelize: no process group: call torch.distributed.init_process_group first "
                           "(e.g. under torchrun)")
    world = dist.get_world_size()
    dp_shard = world if dp_shard is None else dp_shard
    if dp_shard != world:
        raise ValueError(f"parallelize: `dp_shard` ({dp_shard}) must equal the world size ({world})")
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"parallelize: `ep` ({ep!r}) must be a positive integer dividing the world size ({world})")
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moes:
        if m.n_routed_experts % ep:
            raise ValueError(f"parallelize: `ep` ({ep}) must divide `n_routed_experts` ({m.n_routed_experts})")
    # one FSDP unit per decoder layer; the MTP modules stay in the root's unit (the model's
    # forward calls their parts, not the modules themselves)
    layers = list(getattr(getattr(model, "model", None), "layers", []))
    if not layers:
        raise TypeError(f"parallelize: `model` must be an r1x.model.DeepSeekForCausalLM, got {type(model).__name__}")
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    world_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp_shard",))
    mp = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for m in moes:
        if ep > 1:
            expert_parallel(m, mesh.get_group("ep"))
        m.load_group = dist.group.WORLD
        # FSDP averages the expert shard's gradient over its edp ranks; the 1/ep left (the
        # gradient already sums the ep ranks' tokens) is applied in the experts' backward
        # (a divide factor on the reduce-scatter would need PREMUL_SUM, which gloo lacks)
        m.experts.grad_scale = 1.0 / ep
        fully_shard(m.experts, mesh=mesh["edp"], mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for layer in layers:
        fully_shard(layer, mesh=world_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=world_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    model.r1x_mesh = mesh
    if ep > 1:
        # the same ranks as (ep, edp): how an expert tensor is laid out globally (blocks of E/ep
        # experts per EP rank, each block split over its edp ranks), for the checkpoints
        from torch.distributed.device_mesh import DeviceMesh

        layout = torch.arange(world).view(world // ep, ep).t().contiguous()
        model.r1x_expert_mesh = DeviceMesh(device_type, layout, mesh_dim_names=("ep", "edp"))
        if all((m.n_routed_experts // ep) % (world // ep) == 0 for m in moes):
            # even edp shards: every rank holds one equal block of the experts, block k on rank
            # order[k], so a whole expert tensor is one all-gather over the world plus a reorder
            model.r1x_expert_order = layout.reshape(-1).tolist()
    return model


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model under :func:`parallelize`: the gradient norm
    over the whole model (every rank's shards), then every gradient scaled by
    ``min(1, max_norm / norm)`` (torch's formula, with its 1e-6). Works where torch's refuses:
    the dense parameters and the experts are DTensors on different meshes. Every element lives
    on exactly one rank, so the norm is the square root of the world's sum of the local sums of
    squares. A model that is not parallelized falls back to torch's. Returns the norm (float32)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=False)
    if not all(isinstance(g, DTensor) for g in grads):
        raise ValueError("clip_grad_norm_: some gradients are DTensors and some are not: "
                         "is the model only partly parallelized?")
    local = [g.to_local() for g in grads]
    device = local[0].device if local else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for t in local:
        sq += t.float().square().sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for t in local:
        t.mul_(coef.to(t.dtype))
    return norm


def _is_expert_shard(model: nn.Module, name: str, t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return getattr(model, "r1x_expert_mesh", None) is not None and ".experts." in name and isinstance(t, DTensor)


def global_view(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the tensor of ``model``'s parameter or state ``name``, or one shaped like it, e.g.
    its Adam moment) as a global view: an expert shard under expert parallelism becomes one
    DTensor over the ``(ep, edp)`` mesh holding every expert, sharing ``t``'s storage; anything
    else is returned as it is (a DTensor over its own mesh, or a plain tensor)."""
    from torch.distributed.tensor import DTensor, Shard

    if not _is_expert_shard(model, name, t):
        return t
    expert_mesh = model.r1x_expert_mesh
    e_local, rest = t.shape[0], tuple(t.shape[1:])
    shape = torch.Size((e_local * expert_mesh.size(0),) + rest)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t.to_local(), expert_mesh, [Shard(0), Shard(0)], run_check=False,
                              shape=shape, stride=stride)


def _gather_experts(model: nn.Module, t) -> torch.Tensor:
    """A whole expert tensor from its even shards: one all-gather over the world (blocks arrive
    in rank order), then the blocks put in expert order (block k lives on rank ``order[k]``).
    (A 1-D DeviceMesh over the ranks in block order would not do: process groups order their
    ranks by number, so its all-gather would return the blocks in rank order.)"""
    local = t.to_local().contiguous()
    order = model.r1x_expert_order
    out = local.new_empty((len(order) * local.shape[0],) + tuple(local.shape[1:]))
    dist.all_gather_into_tensor(out, local)
    blocks = out.view((len(order),) + tuple(local.shape))
    return blocks[torch.tensor(order, device=out.device)].flatten(0, 1)


def global_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with every sharded tensor as a global view (a DTensor over the
    ranks that hold its parts), so that torch.distributed.checkpoint can save it once and load it
    into any other sharding. The views share the parameters' storage (loading writes into them)."""
    return {name: global_view(model, name, t) for name, t in model.state_dict().items()}


def iter_full_tensors(model: nn.Module):
    """``(name, tensor)`` for each of ``model.state_dict()``'s entries, unsharded, one at a time
    (the dense DTensors all-gathered over the world, the experts over the ``(ep, edp)`` mesh): a
    collective that every rank runs to the end. Plain tensors come as they are (detached)."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        if _is_expert_shard(model, name, t) and getattr(model, "r1x_expert_order", None) is not None:
            yield name, _gather_experts(model, t)
            continue
        t = global_view(model, name, t)
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t.detach())


def checkpoint_metadata(path: str) -> dict:
    """The DCP checkpoint at ``path``'s tensors: ``{key: metadata}`` (keys flattened with dots)."""
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(path).read_metadata().state_dict_metadata


def check_checkpoint_keys(target: dict, path: str, who: str, meta: dict | None = None) -> None:
    """Raise ``ValueError`` when the DCP checkpoint at ``path`` lacks a tensor of ``target``
    (``{name: tensor}``, nested dicts flattened with dots as DCP does) or holds it with another
    global shape: a checkpoint of another model config. ``meta``: its
    :func:`checkpoint_metadata`, when the caller has read it already."""
    meta = checkpoint_metadata(path) if meta is None else meta
    flat = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v

    walk("", target)
    missing = sorted(set(flat) - set(meta))
    wrong = sorted(k for k, t in flat.items() if k in meta and hasattr(meta[k], "size") and hasattr(t, "shape")
                   and tuple(meta[k].size) != tuple(t.shape))
    if missing or wrong:
        k = (missing or wrong)[0]
        raise ValueError(f"{who}: {path!r} is not a checkpoint of this model: "
                         + (f"{len(missing)} tensors missing (e.g. {k!r})" if missing else
                            f"{k!r} is {list(meta[k].size)} there and {list(flat[k].shape)} here"))


def save_checkpoint(model: nn.Module, path: str) -> None:
    """Save ``model``'s weights and buffers with ``torch.distributed.checkpoint`` (DCP), each
    rank writing its own shards, into the folder ``path``, atomically: the files land in
    ``path + ".tmp"`` and the folder is renamed once every rank has written. Works for a model
    under :func:`parallelize` (any mesh) and for a plain one (one process, or every rank the same);
    :func:`load_checkpoint` reads it back into any other sharding."""
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    tmp = path.rstrip("/") + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    if distributed:
        dist.barrier()
    dcp.save(global_state_dict(model), checkpoint_id=tmp, no_dist=not distributed)
    if distributed:
        dist.barrier()
    if rank == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    if distributed:
        dist.barrier()


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a :func:`save_checkpoint` folder into ``model`` in place, whatever the number of ranks
    and the mesh it was saved with (DCP reshards). Every tensor of the model must be in the
    checkpoint with its global shape: a checkpoint of another config is a ``ValueError``."""
    import torch.distributed.checkpoint as dcp

    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint folder at {path!r}")
    distributed = dist.is_available() and dist.is_initialized()
    target = global_state_dict(model)
    check_checkpoint_keys(target, path, "load_checkpoint")
    dcp.load(target, checkpoint_id=path, no_dist=not distributed)
