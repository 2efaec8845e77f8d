"""Per-rank training memory under r1x.parallel.parallelize (FSDP2 + expert parallelism), computed
from a model config (no weights are allocated: the model is built on the meta device).

    python benchmarks/dist_memory.py                 # the README's table (v2-lite, v3)
    python benchmarks/dist_memory.py --preset small --meshes 1x1,2x2,4x2

What is counted, per rank, with torchtitan's mixed precision (bf16 compute, fp32 master weights,
fp32 gradient reduction, AdamW):
- sharded state: every parameter is 1/world of the model (dense parameters FSDP over all ranks;
  routed experts EP over `ep` ranks, then FSDP over the `world/ep` ranks holding the same
  experts): fp32 weight 4 B + fp32 gradient 4 B + Adam m and v 8 B = 16 B per parameter;
- gathered: the largest decoder layer unsharded in bf16 for its forward/backward (its dense
  part whole, its expert part 1/ep), twice (FSDP prefetches the next layer);
- DDP, for comparison: the whole model's 16 B per parameter on every rank.
Activations are not counted (they depend on the batch; r1x's MLA stores O(L) per token).
The all-to-all moves 2 * top_k * hidden * 2 B per token per MoE layer in bf16 forward (each
token copy there and back) and as much again backward.
"""

from __future__ import annotations

import argparse

from r1x.model import DeepSeekConfig, DeepSeekForCausalLM

GB = 1e9
STATE_BYTES = 16  # fp32 weight + fp32 grad + Adam m, v


def count(config: DeepSeekConfig) -> dict:
    model = DeepSeekForCausalLM(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    layer_dense, layer_experts = 0, 0
    for layer in list(model.model.layers) + list(model.mtp):
        d = sum(p.numel() for n, p in layer.named_parameters() if ".experts." not in n)
        e = sum(p.numel() for n, p in layer.named_parameters() if ".experts." in n)
        if d + e > layer_dense + layer_experts:
            layer_dense, layer_experts = d, e
    return {"total": total, "experts": experts, "layer_dense": layer_dense, "layer_experts": layer_experts}


def per_rank(c: dict, world: int, ep: int) -> dict:
    state = c["total"] / world * STATE_BYTES
    gathered = 2 * 2 * (c["layer_dense"] + c["layer_experts"] / ep)
    return {"params": c["total"] / world, "state_gb": state / GB, "gathered_gb": gathered / GB,
            "ddp_gb": c["total"] * STATE_BYTES / GB}


def a2a_bytes(config: DeepSeekConfig) -> int:
    """bf16 bytes one token sends and receives per MoE layer in a forward."""
    return 2 * config.num_experts_per_tok * config.hidden_size * 2


DEFAULT_MESHES = {"v2-lite": [(1, 1), (8, 8), (16, 16), (64, 64)], "v3": [(64, 64), (256, 256), (1024, 256)]}


def table(presets: list[str], meshes: list[tuple[int, int]] | None = None) -> str:
    rows = ["| model | parameters | ranks | ep | parameters / rank | weights + grads + Adam / rank | "
            "+ gathered layer | DDP / rank | all-to-all / token / MoE layer (fwd, bf16) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in presets:
        cfg = DeepSeekConfig.preset(name)
        c = count(cfg)
        for world, ep in meshes or DEFAULT_MESHES.get(name, [(1, 1), (2, 2), (4, 2)]):
            if world % ep or cfg.n_routed_experts % ep:
                raise SystemExit(f"mesh {world}x{ep}: ep must divide the ranks and n_routed_experts")
            r = per_rank(c, world, ep)
            rows.append(f"| {name} | {c['total'] / 1e9:.2f} B | {world} | {ep} | {r['params'] / 1e9:.3f} B | "
                        f"{r['state_gb']:.1f} GB | {r['gathered_gb']:.2f} GB | {r['ddp_gb']:.0f} GB | "
                        f"{a2a_bytes(cfg) / 1e3:.0f} KB |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", help="config preset (repeatable; default: v2-lite and v3)")
    p.add_argument("--meshes", help="ranks x ep pairs, e.g. 8x8,16x16")
    a = p.parse_args(argv)
    meshes = [tuple(int(v) for v in m.split("x")) for m in a.meshes.split(",")] if a.meshes else None
    print(table(a.preset or ["v2-lite", "v3"], meshes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
