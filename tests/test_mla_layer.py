"""r1x.nn.MLA and r1x.nn.PagedLatentCache: the layer against transformers' DeepseekV3Attention
(checkpoint layout, RoPE/YaRN, softmax scale, packed sequences), the absorbed decode path
against the training path token by token over a fragmented, NaN-poisoned paged cache (block
sizes 1, 16, 64; Sq = 1 and 2; rollback), gradients against the reference op, the cache's
bookkeeping, and errors that name the bad argument."""

import pytest
import torch

import r1x.nn.mla as mla_module
from r1x import reference
from r1x.nn import MLA, OutOfBlocksError, PagedLatentCache, RMSNorm, RotaryEmbedding
from r1x.testing import assert_raises_naming, calc_diff

# a scaled-down DeepSeek-V3 attention: H = 4, Dqk = 16 + 8, Dv = 12, latent 32 + 8
DIMS = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=12)
# YaRN as DeepSeek-V3 configures it, with mscale != mscale_all_dim so both corrections show
# (cos/sin scaled by mscale(0.707)/mscale(1.0); softmax scale by mscale(1.0)^2)
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
CONFIGS = {  # name: (q_lora_rank, rope_scaling, rope_interleave, attention_bias)
    "v3-yarn": (24, YARN, True, False),
    "v2lite": (None, None, True, False),  # no q LoRA: q_proj
    "plain-rope-bias": (24, None, False, True),
}


def make_layer(gen, name="v3-yarn", dtype=torch.float32, layer_idx=0, device="cpu"):
    q_lora, scaling, interleave, bias = CONFIGS[name]
    layer = MLA(**DIMS, q_lora_rank=q_lora, rope_scaling=scaling, rope_interleave=interleave, attention_bias=bias,
                max_position_embeddings=256, layer_idx=layer_idx, dtype=dtype, device=device)
    randomize(layer, gen)
    return layer


def randomize(module, gen):
    """Fresh parameters: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1^2), biases small."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "layernorm" in n:
                v = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            elif n.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=gen)
            else:
                v = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
            p.copy_(v.to(p.dtype))


def close(got, exp, rtol=1e-4, msg=None):
    """fp32 results of differently ordered computations: relative, with an absolute floor at
    1e-5 of the largest value (measured differences are ~1e-6 relative)."""
    atol = 1e-5 * max(exp.abs().max().item(), 1e-3)
    torch.testing.assert_close(got.double().cpu(), exp.double().cpu(), rtol=rtol, atol=atol, msg=msg)


def packed(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def poison_unused(cache):
    """NaN into every slot no sequence holds in that layer (free blocks, reserved room, rows
    past a layer's length, rows left by a truncate): a read outside the contract shows."""
    with torch.no_grad():
        owned = set()
        for s in cache.sequences:
            blocks = cache.blocks(s)
            owned.update(blocks)
            for layer in range(cache.num_layers):
                n = cache.length(s, layer)
                flat = [b * cache.block_size + j for i, b in enumerate(blocks) for j in range(cache.block_size)
                        if i * cache.block_size + j >= n]
                if flat:
                    cache.kv[layer].view(-1, cache.dim)[torch.tensor(flat, device=cache.device)] = float("nan")
        free = [b for b in range(cache.num_blocks) if b not in owned]
        assert sorted(free) == sorted(cache.free_blocks)
        if free:
            cache.kv[:, torch.tensor(free, device=cache.device)] = float("nan")


# ----------------------------------------------------------------------------------------------
# against transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers_deepseek_v3_attention(gen, name):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    q_lora, scaling, interleave, bias = CONFIGS[name]
    rope = {"rope_theta": 10000.0, **(scaling or {"rope_type": "default"})}
    cfg = DeepseekV3Config(**DIMS, num_key_value_heads=DIMS["num_attention_heads"], q_lora_rank=q_lora,
                           max_position_embeddings=256, rope_parameters=rope,
                           rope_interleave=interleave, attention_bias=bias)
    cfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(cfg, layer_idx=0).eval()
    randomize(hf, gen)
    rotary = DeepseekV3RotaryEmbedding(cfg)
    layer = MLA.from_config(cfg)
    layer.load_state_dict(hf.state_dict(), strict=True)  # the same names and shapes
    assert layer.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)
    assert torch.equal(layer.rotary.inv_freq, rotary.inv_freq)
    assert layer.rotary.attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)

    def run_hf(x, pos):  # x [B, S, hidden], pos [B, S]
        s = x.shape[1]
        mask = torch.full((s, s), float("-inf")).triu(1).expand(x.shape[0], 1, s, s)
        with torch.no_grad():
            return hf(x, rotary(x, pos), mask)[0]

    # [B, S, hidden], positions past YaRN's original context in row 1
    x = torch.randn(2, 7, 64, generator=gen)
    pos = torch.stack([torch.arange(7), torch.arange(7) + 90])
    with torch.no_grad():
        y = layer(x, positions=pos)
        y_default = layer(x[:1])
    y_hf = run_hf(x, pos)
    close(y, y_hf)
    close(y_default, y_hf[:1])  # default positions 0..S-1

    # packed sequences of different lengths (one empty) against transformers run per sequence
    lengths = [5, 1, 0, 11, 3]
    cu = packed(lengths)
    xs = torch.randn(sum(lengths), 64, generator=gen)
    offsets = [0, 40, 3, 17, 120]
    pos = torch.cat([torch.arange(n) + o for n, o in zip(lengths, offsets)])
    with torch.no_grad():
        y = layer(xs, positions=pos, cu_seqlens=cu)
    assert y.shape == xs.shape
    for b, n in enumerate(lengths):
        if n:
            s, e = cu[b].item(), cu[b + 1].item()
            close(y[s:e], run_hf(xs[s:e].unsqueeze(0), pos[s:e].unsqueeze(0))[0], msg=f"sequence {b}")


def test_rope_and_norm_details(gen):
    # the module's dtype cast leaves the frequencies float32
    layer = make_layer(gen).to(torch.bfloat16)
    assert layer.rotary.inv_freq.dtype == torch.float32 and layer.dtype == torch.bfloat16
    assert torch.equal(layer.rotary.inv_freq, make_layer(gen).rotary.inv_freq)
    # YaRN: high frequencies kept, low ones divided by the factor; DeepSeek-V3's own numbers
    v3_yarn = {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
               "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
    rotary = RotaryEmbedding(64, 10000.0, v3_yarn)
    plain = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    inv = rotary.inv_freq
    # the ramp runs over dims floor(10.5) = 10 to ceil(22.5) = 23 of 32
    assert torch.equal(inv[:11], plain[:11]) and torch.allclose(inv[23:], plain[23:] / 40, rtol=1e-6, atol=0)
    assert inv[11:23].lt(plain[11:23]).all() and inv[11:23].gt(plain[11:23] / 40).all()
    assert rotary.attention_factor == 1.0
    v3 = MLA(7168, 128, rope_scaling=v3_yarn, device="meta")
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 1.0 * torch.tensor(40.0).log().item() + 1) ** 2)
    # RMSNorm: float32 statistics, cast back, then the weight
    norm = RMSNorm(24, eps=1e-6)
    randomize(norm, gen)
    x = torch.randn(5, 24, generator=gen).to(torch.bfloat16)
    x32 = x.float()
    exp = norm.weight * (x32 / (x32.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), exp, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# decode (absorbed, paged latent cache) against the training path
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_decode_equals_training_path_token_by_token(device, gen, block_size):
    """Two layers share one cache. Five sequences of different lengths (one with an empty
    prompt) are prefilled through forward(cache=...), then decoded with Sq = 1 and Sq = 2 steps
    in shuffled batch order, with a rejected draft token rolled back, while other sequences
    come and go so the blocks are reused out of order; every unused slot holds NaN. Each new
    token's output must equal the packed training forward over the full sequences."""
    layers = [make_layer(gen, "v3-yarn", layer_idx=0, device=device),
              make_layer(gen, "v2lite", layer_idx=1, device=device)]
    totals = [13, 1, 23, 6, 17]
    prompts = [5, 1, 0, 3, 9]
    ids = [11, 3, 7, 40, 2]
    xs = [torch.randn(sum(totals), 64, generator=gen).to(device) for _ in layers]
    cu = packed(totals).to(device)
    with torch.no_grad():
        full = [layer(x, cu_seqlens=cu) for layer, x in zip(layers, xs)]

    def rows(b, start, n):  # rows of sequence b's tokens start..start+n in the packed tensors
        return slice(cu[b].item() + start, cu[b].item() + start + n)

    blocks_for = [-(-n // block_size) for n in totals]
    cache = PagedLatentCache(sum(blocks_for) + 6, block_size, layers[0].latent_dim, num_layers=2, device=device)
    churn = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=gen)))

    def add_other(sid, n):
        cache.add(sid)
        for layer in range(2):
            cache.append(layer, [sid], torch.randn(1, n, cache.dim, generator=churn).to(device))

    def other_traffic(step):
        """Sequences that come and go (their tokens in both layers) between the real steps,
        never taking the blocks the real sequences will need."""
        for sid in [s for s in cache.sequences if s >= 1000]:
            if torch.rand(1, generator=churn) < 0.5:
                cache.free(sid)
        held = sum(len(cache.blocks(s)) for s in ids if s in cache)
        spare = cache.num_free_blocks - (sum(blocks_for) - held)
        if spare > 0 and torch.rand(1, generator=churn) < 0.7:
            n = int(torch.randint(1, 2 * block_size + 1, (1,), generator=churn))
            add_other(1000 + step, min(n, spare * block_size))
        poison_unused(cache)

    # fragment the free list before the real sequences arrive: four others, two of them ended
    for sid in range(1000, 1004):
        add_other(sid, block_size + 1 if sid == 1001 else 1)
    cache.free(1002)
    cache.free(1000)
    poison_unused(cache)

    # prefill: packed forward over the prompts, writing the latents
    for sid in ids:
        cache.add(sid)
    cu_p = packed(prompts).to(device)
    for layer, x, f in zip(layers, xs, full):
        xp = torch.cat([x[rows(b, 0, p)] for b, p in enumerate(prompts)])
        with torch.no_grad():
            y = layer(xp, cu_seqlens=cu_p, cache=cache, seq_ids=ids)
        close(y, torch.cat([f[rows(b, 0, p)] for b, p in enumerate(prompts)]), msg="prefill")
    assert [cache.length(s) for s in ids] == prompts
    poison_unused(cache)

    done = list(prompts)
    step, rolled_back = 0, False
    while any(d < t for d, t in zip(done, totals)):
        other_traffic(10 + step)
        sq = 2 if step % 2 else 1
        batch = [b for b in range(len(ids)) if totals[b] - done[b] >= sq]
        if not batch:
            sq, batch = 1, [b for b in range(len(ids)) if done[b] < totals[b]]
        batch = [batch[i] for i in torch.randperm(len(batch), generator=churn).tolist()]
        seq_ids = [ids[b] for b in batch]
        if sq == 2 and not rolled_back:
            # MTP-style verification that rejects the last draft token: both tokens are
            # computed, then the cache is rolled back by one and that token decoded again
            for layer, x, f in zip(layers, xs, full):
                bad = torch.stack([torch.cat([x[rows(b, done[b], 1)], torch.randn(1, 64, generator=gen).to(device)])
                                   for b in batch])
                y = layer.decode(bad, cache, seq_ids)
                close(y[:, 0], torch.cat([f[rows(b, done[b], 1)] for b in batch]), msg="draft's first token")
            for b in batch:
                cache.truncate(ids[b], done[b] + 1)
                done[b] += 1
            poison_unused(cache)
            rolled_back = True
            step += 1
            continue
        for layer, x, f in zip(layers, xs, full):
            y = layer.decode(torch.stack([x[rows(b, done[b], sq)] for b in batch]), cache, seq_ids)
            assert y.shape == (len(batch), sq, 64)
            exp = torch.stack([f[rows(b, done[b], sq)] for b in batch])
            close(y, exp, msg=f"step {step}, Sq = {sq}")
        for b in batch:
            done[b] += sq
        assert [cache.length(ids[b], 1) for b in batch] == [done[b] for b in batch]
        step += 1
    assert rolled_back and [cache.length(s) for s in ids] == totals
    # the blocks really were reused out of order
    flat = [blk for s in ids for blk in cache.blocks(s)]
    assert flat != list(range(len(flat)))


def test_decode_bf16_and_empty_batch(gen):
    layer = make_layer(gen, "v3-yarn", dtype=torch.bfloat16)
    cache = PagedLatentCache(8, 16, layer.latent_dim, dtype=torch.bfloat16)
    x = torch.randn(2, 9, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        full = layer(x)
    cache.add(0)
    cache.add(1)
    layer(x[:, :6].reshape(-1, 64), cu_seqlens=packed([6, 6]), cache=cache, seq_ids=[0, 1])
    ys = [layer.decode(x[:, 6:7], cache, [0, 1]), layer.decode(x[:, 7:9], cache, [0, 1])]
    y = torch.cat(ys, dim=1)
    assert y.dtype == torch.bfloat16
    # bf16 operands and a different association (absorbed weights): measured calc_diff 0.9e-5 -
    # 1.1e-5 (max error ~0.5% of the largest output) with exact attention; a wrong scale or
    # position gives > 1e-2
    assert calc_diff(y, full[:, 6:]) < 2e-4
    empty = layer.decode(x[:0, :1], cache, [])
    assert empty.shape == (0, 1, 64)


# ----------------------------------------------------------------------------------------------
# gradients: the training path against the reference op in float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["v3-yarn", "plain-rope-bias"])
def test_gradients_match_reference_path(device, gen, name, monkeypatch):
    layer = make_layer(gen, name, device=device)
    ref = make_layer(gen, name, dtype=torch.float64)
    ref.load_state_dict(layer.state_dict())
    lengths = [6, 1, 9]
    cu = packed(lengths)
    x = torch.randn(sum(lengths), 64, generator=gen).to(device).requires_grad_()
    x64 = x.detach().double().cpu().requires_grad_()
    g = torch.randn(x.shape, generator=gen)
    layer(x, cu_seqlens=cu.to(device)).backward(g.to(device))
    monkeypatch.setattr(mla_module, "mla_attention", reference.mla_attention)
    y64 = ref(x64, cu_seqlens=cu)
    y64.backward(g.double())
    monkeypatch.undo()
    grads = {"x": (x.grad, x64.grad)}
    params64 = dict(ref.named_parameters())
    grads.update({n: (p.grad, params64[n].grad) for n, p in layer.named_parameters()})
    for n, (got, exp) in grads.items():
        assert got is not None and got.abs().max() > 0, n
        close(got, exp, msg=n)


# ----------------------------------------------------------------------------------------------
# the cache's bookkeeping
# ----------------------------------------------------------------------------------------------
def test_cache_alloc_append_truncate_free_reuse(gen):
    cache = PagedLatentCache(6, 4, 5, num_layers=2, dtype=torch.float32)
    assert cache.kv.shape == (2, 6, 4, 5) and cache.num_free_blocks == 6
    assert cache.bytes_per_token() == 2 * 5 * 4
    cache.add(7)
    cache.add(3)
    assert cache.sequences == [7, 3] and 7 in cache and 5 not in cache and len(cache) == 2
    assert cache.blocks(7) == [] and cache.length(7) == 0
    a = torch.randn(1, 6, 5, generator=gen)
    cache.append(0, [7], a)  # 6 tokens: blocks 0, 1
    assert cache.blocks(7) == [0, 1] and cache.length(7) == 6
    assert cache.length(7, 0) == 6 and cache.length(7, 1) == 0  # per layer
    assert torch.equal(cache.kv[0, 0], a[0, :4]) and torch.equal(cache.kv[0, 1, :2], a[0, 4:])
    cache.append(1, [7], a)  # the other layer reuses the blocks
    assert cache.blocks(7) == [0, 1] and cache.length(7, 1) == 6
    # packed append to two sequences, one of them empty
    p = torch.randn(3, 5, generator=gen)
    cache.append(0, [3, 7], p, cu_seqlens=torch.tensor([0, 0, 3]))
    assert cache.blocks(3) == [] and cache.blocks(7) == [0, 1, 2] and cache.length(7, 0) == 9
    assert torch.equal(cache.kv[0, 1, 2:], p[:2]) and torch.equal(cache.kv[0, 2, 0], p[2])
    cache.append(0, [3], torch.randn(1, 2, 5, generator=gen))
    assert cache.blocks(3) == [3]
    table = cache.block_table([3, 7])
    assert table.dtype == torch.int32 and table.tolist() == [[3, 0, 0], [0, 1, 2]]
    assert cache.block_table([3], max_blocks=5).tolist() == [[3, 0, 0, 0, 0]]
    lens = cache.seqlens([7, 3], layer=0)
    assert lens.dtype == torch.int32 and lens.tolist() == [9, 2]
    assert cache.seqlens([7, 3], layer=1).tolist() == [6, 0]
    # truncate: lengths in every layer, blocks past the new end freed
    cache.truncate(7, 5)
    assert cache.length(7, 0) == 5 and cache.length(7, 1) == 5 and cache.blocks(7) == [0, 1]
    assert cache.free_blocks[-1] == 2 and cache.num_free_blocks == 3
    cache.truncate(7, 5)  # no-op
    cache.truncate(7, 0)
    assert cache.blocks(7) == [] and cache.length(7) == 0
    # free returns the blocks; the next allocations reuse them most recently freed first
    cache.free(3)
    assert 3 not in cache and cache.num_free_blocks == 6
    cache.add(3)
    cache.append(0, [3], torch.randn(1, 9, 5, generator=gen))
    assert cache.blocks(3) == [3, 0, 1]
    # reserve: room without lengths; the appends then take no new block
    assert cache.blocks_needed([7, 3], 4) == 1 + 1  # 0 + 4 tokens: 1 block; 9 + 4 tokens: 4 blocks
    cache.reserve([7, 3], 4)
    assert cache.length(7) == 0 and len(cache.blocks(7)) == 1 and len(cache.blocks(3)) == 4
    free = cache.num_free_blocks
    cache.append(0, [7, 3], torch.randn(2, 3, 5, generator=gen))
    assert cache.num_free_blocks == free
    cache.reset()
    assert len(cache) == 0 and cache.num_free_blocks == 6


def test_cache_out_of_blocks_changes_nothing(gen):
    cache = PagedLatentCache(4, 2, 3, num_layers=1)
    for s in (0, 1):
        cache.add(s)
    cache.append(0, [0], torch.randn(1, 5, 3, generator=gen))  # 3 blocks
    state = (cache.blocks(0), cache.blocks(1), cache.free_blocks, cache.seqlens([0, 1]).tolist())
    # 2 more tokens each: sequence 0 (5 -> 7 tokens) and sequence 1 (0 -> 2) need a block each, 1 is free
    assert cache.blocks_needed([0, 1], 2) == 2
    with pytest.raises(OutOfBlocksError, match="out of blocks.*2 more block.*1 of `num_blocks` = 4"):
        cache.append(0, [0, 1], torch.randn(2, 2, 3, generator=gen))
    with pytest.raises(OutOfBlocksError):
        cache.reserve([0, 1], 2)
    assert (cache.blocks(0), cache.blocks(1), cache.free_blocks, cache.seqlens([0, 1]).tolist()) == state
    # through the layer: the decode step raises before writing anything
    layer = make_layer(gen)
    cache = PagedLatentCache(2, 2, layer.latent_dim)
    cache.add(0)
    layer(torch.randn(4, 64, generator=gen), cache=cache, seq_ids=[0])
    with pytest.raises(OutOfBlocksError, match="out of blocks"):
        layer.decode(torch.randn(1, 1, 64, generator=gen), cache, [0])
    assert cache.length(0) == 4
    cache.truncate(0, 3)
    layer.decode(torch.randn(1, 1, 64, generator=gen), cache, [0])  # the rolled-back slot is reused
    assert cache.length(0) == 4


# ----------------------------------------------------------------------------------------------
# bad input of every kind
# ----------------------------------------------------------------------------------------------
def test_bad_constructor_arguments():
    def bad(name, **kw):
        assert_raises_naming(lambda: MLA(**{**DIMS, **kw}), f"`{name}`")

    bad("hidden_size", hidden_size=0)
    bad("num_attention_heads", num_attention_heads=-2)
    bad("q_lora_rank", q_lora_rank=0)
    bad("kv_lora_rank", kv_lora_rank=1.5)
    bad("qk_nope_head_dim", qk_nope_head_dim=0)
    bad("qk_rope_head_dim", qk_rope_head_dim=7)  # RoPE rotates pairs
    bad("v_head_dim", v_head_dim=None)
    bad("layer_idx", layer_idx=-1)
    bad("rope_theta", rope_theta=0.0)
    bad("dtype", dtype=torch.int32)
    bad("rope_scaling", rope_scaling="yarn")
    bad("rope_scaling", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    for key, value in (("original_max_position_embeddings", None), ("factor", -1.0), ("beta_fast", float("nan")),
                       ("mscale_all_dim", "1")):
        assert_raises_naming(lambda: MLA(**DIMS, rope_scaling={**YARN, key: value}), f"`rope_scaling['{key}']`")
    for name, kw in (("num_blocks", dict(num_blocks=0)), ("block_size", dict(block_size=-1)), ("dim", dict(dim=0)),
                     ("num_layers", dict(num_layers=0)), ("dtype", dict(dtype=torch.float64))):
        args = {"num_blocks": 4, "block_size": 2, "dim": 8, **kw}
        assert_raises_naming(lambda: PagedLatentCache(**args), f"`{name}`")
    assert_raises_naming(lambda: RMSNorm(0), "`hidden_size`")


def test_bad_forward_and_decode_inputs(gen):
    layer = make_layer(gen)
    x = torch.randn(6, 64, generator=gen)
    cu = packed([2, 4])
    cache = PagedLatentCache(8, 4, layer.latent_dim)
    cache.add(0)
    cache.add(1)

    def bad(fn, *names):
        assert_raises_naming(fn, *names)

    bad(lambda: layer(torch.randn(6, 63)), "`x`", "64")
    bad(lambda: layer(torch.randn(64)), "`x`")
    bad(lambda: layer(torch.randn(1, 2, 3, 64)), "`x`")
    bad(lambda: layer(x.long()), "`x`")
    bad(lambda: layer([1.0]), "`x`")
    bad(lambda: layer(x, cu_seqlens=cu.float()), "`cu_seqlens`")
    bad(lambda: layer(x, cu_seqlens=cu.view(1, 3)), "`cu_seqlens`")
    bad(lambda: layer(x, cu_seqlens=[0, 2, 6]), "`cu_seqlens`")
    bad(lambda: layer(x, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), "`cu_seqlens`")  # op's check
    bad(lambda: layer(x.view(2, 3, 64), cu_seqlens=cu), "`cu_seqlens`")
    bad(lambda: layer(x, positions=torch.arange(6.0)), "`positions`")
    bad(lambda: layer(x, positions=torch.arange(5)), "`positions`")
    bad(lambda: layer(x.view(2, 3, 64), positions=torch.arange(6)), "`positions`")
    bad(lambda: layer(x, cu_seqlens=cu, seq_ids=[0, 1]), "`seq_ids`", "`cache`")
    bad(lambda: layer(x, cu_seqlens=cu, cache=cache), "`seq_ids`")
    bad(lambda: layer(x, cu_seqlens=cu, cache=cache, seq_ids=[0]), "`seq_ids`")
    bad(lambda: layer(x, cu_seqlens=cu, cache=cache, seq_ids=[0, 5]), "`seq_ids`", "5")
    bad(lambda: layer(x, cu_seqlens=cu, cache=cache, seq_ids=[1, 1]), "`seq_ids`", "distinct")
    bad(lambda: layer(x, cu_seqlens=cu, cache="cache", seq_ids=[0, 1]), "`cache`")
    bad(lambda: layer(x, cu_seqlens=cu, cache=PagedLatentCache(4, 4, 41), seq_ids=[0, 1]), "`cache`", "40")
    bad(lambda: layer(x, cu_seqlens=cu, cache=PagedLatentCache(4, 4, 40, dtype=torch.bfloat16), seq_ids=[0, 1]),
        "`cache`", "dtype")
    bad(lambda: make_layer(gen, layer_idx=2)(x, cu_seqlens=cu, cache=cache, seq_ids=[0, 1]), "`layer_idx`",
        "num_layers")
    layer(x, cu_seqlens=cu, cache=cache, seq_ids=[0, 1])
    bad(lambda: layer(x, cu_seqlens=cu, cache=cache, seq_ids=[0, 1]), "`cache`", "decode")  # not empty any more
    # decode
    x3 = torch.randn(2, 1, 64, generator=gen)
    bad(lambda: layer.decode(x3.view(2, 64), cache, [0, 1]), "`x`", "[B, Sq, hidden]")
    bad(lambda: layer.decode(x3[:, :0], cache, [0, 1]), "`x`", "Sq >= 1")
    bad(lambda: layer.decode(x3, cache, [0]), "`seq_ids`")
    bad(lambda: layer.decode(x3, cache, 0), "`seq_ids`")
    bad(lambda: layer.decode(x3, cache, [0, 9]), "`seq_ids`")
    bad(lambda: layer.decode(x3, None, [0, 1]), "`cache`")
    bad(lambda: layer.decode(x3, cache, [0, 1], positions=torch.zeros(2, 2, dtype=torch.long)), "`positions`")
    assert cache.seqlens([0, 1]).tolist() == [2, 4]  # nothing was written by the failed calls


def test_bad_cache_arguments(gen):
    cache = PagedLatentCache(4, 2, 3, num_layers=2)
    cache.add(0)

    def bad(fn, *names):
        assert_raises_naming(fn, *names)

    bad(lambda: cache.add(0), "`seq_id`", "already")
    bad(lambda: cache.add("a"), "`seq_id`")
    bad(lambda: cache.free(5), "`seq_id`", "5")
    bad(lambda: cache.truncate(5, 0), "`seq_id`")
    bad(lambda: cache.truncate(0, 1), "`length`", "[0, 0]")
    bad(lambda: cache.truncate(0, -1), "`length`")
    bad(lambda: cache.length(0, layer=2), "`layer`")
    bad(lambda: cache.reserve([0], -1), "`num_tokens`")
    bad(lambda: cache.reserve(0, 1), "`seq_ids`")
    bad(lambda: cache.block_table([0, 0]), "`seq_ids`", "distinct")
    bad(lambda: cache.block_table([1]), "`seq_ids`", "1")
    bad(lambda: cache.block_table([0], max_blocks=0), "`max_blocks`")
    bad(lambda: cache.seqlens([0], layer=-1), "`layer`")
    lat = torch.randn(1, 2, 3, generator=gen)
    bad(lambda: cache.append(2, [0], lat), "`layer`")
    bad(lambda: cache.append(0, [0], lat.double()), "`latents`", "dtype")
    bad(lambda: cache.append(0, [0], lat[..., :2]), "`latents`", "dim = 3")
    bad(lambda: cache.append(0, [0], lat[0]), "`latents`")
    bad(lambda: cache.append(0, [0], lat.numpy()), "`latents`")
    bad(lambda: cache.append(0, [0], lat[0], cu_seqlens=[0, 3]), "`cu_seqlens`")
    bad(lambda: cache.append(0, [0], lat[0], cu_seqlens=torch.tensor([0.0, 2.0])), "`cu_seqlens`")
    bad(lambda: cache.append(0, [0, 3], lat), "`seq_ids`")
    assert cache.length(0) == 0 and cache.num_free_blocks == 4


# ----------------------------------------------------------------------------------------------
# empty inputs, torch.compile
# ----------------------------------------------------------------------------------------------
def test_empty_inputs(gen):
    layer = make_layer(gen)
    x = torch.randn(0, 64, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 64) and x.grad.shape == (0, 64)
    assert layer(torch.randn(2, 0, 64)).shape == (2, 0, 64)
    cache = PagedLatentCache(4, 4, layer.latent_dim)
    cache.add(0)
    cache.add(1)
    with torch.no_grad():  # two empty prompts: nothing written, nothing allocated
        assert layer(x.detach(), cu_seqlens=packed([0, 0]), cache=cache, seq_ids=[0, 1]).shape == (0, 64)
    assert cache.seqlens([0, 1]).tolist() == [0, 0] and cache.num_free_blocks == 4
    assert layer.decode(torch.randn(2, 1, 64, generator=gen), cache, [0, 1]).shape == (2, 1, 64)


def test_torch_compile_training_path(gen):
    """One graph, forward and backward (aot_eager: dynamo, the ops' fakes and autograd, without
    inductor's minute of codegen; the ops themselves are compile-tested in test_mla.py)."""
    layer = make_layer(gen)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(9, 64, generator=gen, requires_grad=True)
    cu = packed([4, 5])
    y = compiled(x, cu_seqlens=cu)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    y_e = layer(x, cu_seqlens=cu)
    y_e.square().sum().backward()
    close(y, y_e)
    close(g, x.grad)
