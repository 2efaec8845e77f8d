import json
import os

import pytest
import torch
from safetensors.torch import save_file

import r1x
from r1x.model.checkpoint import (
    FP8_QUANTIZATION_CONFIG,
    is_fp8_quantized_weight,
    load_state_dict,
    merge_mtp_state_dict,
    mtp_keys,
    save_state_dict,
    split_mtp_state_dict,
)

E4M3 = torch.float8_e4m3fn


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def tiny_state_dict(dtype, hidden=160, inter=128, experts=3, vocab=50, layers=2):
    """HF-named state dict of a small DeepseekV3 (layer 0 dense, layer 1 MoE, fused experts)."""
    sd = {"model.embed_tokens.weight": _randn(vocab, hidden, dtype=dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _randn(hidden, dtype=dtype)
        sd[p + "self_attn.q_a_proj.weight"] = _randn(96, hidden, dtype=dtype)
        sd[p + "self_attn.q_a_layernorm.weight"] = _randn(96, dtype=dtype)
        sd[p + "self_attn.q_b_proj.weight"] = _randn(129, 96, dtype=dtype)
        sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = _randn(40, hidden, dtype=dtype)
        sd[p + "self_attn.kv_a_layernorm.weight"] = _randn(32, dtype=dtype)
        sd[p + "self_attn.kv_b_proj.weight"] = _randn(64, 32, dtype=dtype)
        sd[p + "self_attn.o_proj.weight"] = _randn(hidden, 48, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = _randn(hidden, dtype=dtype)
        if i == 0:
            for n, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                sd[p + f"mlp.{n}.weight"] = _randn(*shape, dtype=dtype)
        else:
            sd[p + "mlp.gate.weight"] = _randn(experts, hidden)
            sd[p + "mlp.gate.e_score_correction_bias"] = _randn(experts)
            sd[p + "mlp.experts.gate_up_proj"] = _randn(experts, 2 * inter, hidden, dtype=dtype)
            sd[p + "mlp.experts.down_proj"] = _randn(experts, hidden, inter, dtype=dtype)
            for n, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                sd[p + f"mlp.shared_experts.{n}.weight"] = _randn(*shape, dtype=dtype)
    sd["model.norm.weight"] = _randn(hidden, dtype=dtype)
    sd["lm_head.weight"] = _randn(vocab, hidden, dtype=dtype)
    return sd


CONFIG = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def _assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_sharded(tmp_path, dtype):
    sd = tiny_state_dict(dtype)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = save_state_dict(tmp_path, sd, CONFIG, max_shard_bytes=total // 5)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    n = len(shards)
    assert n >= 5
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == index
    assert set(on_disk["weight_map"].values()) == set(shards)
    # routed experts are written per expert, the way DeepSeek-V3 ships them
    assert "model.layers.1.mlp.experts.2.up_proj.weight" in on_disk["weight_map"]
    assert "model.layers.1.mlp.experts.gate_up_proj" not in on_disk["weight_map"]
    assert on_disk["metadata"]["total_size"] == total
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG

    loaded, cfg = load_state_dict(tmp_path)
    assert cfg == CONFIG
    _assert_same(loaded, sd)

    # the per-expert layout as stored, on request
    raw, _ = load_state_dict(tmp_path, fuse_routed_experts=False)
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(raw["model.layers.1.mlp.experts.1.gate_proj.weight"], gu[1, :128])
    assert torch.equal(raw["model.layers.1.mlp.experts.1.up_proj.weight"], gu[1, 128:])


def test_round_trip_fused_layout_and_rewrite(tmp_path):
    sd = tiny_state_dict(torch.float32)
    save_state_dict(tmp_path, sd, CONFIG, max_shard_bytes=10**5, split_routed_experts=False)
    assert "model.layers.1.mlp.experts.gate_up_proj" in json.loads(
        (tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    _assert_same(load_state_dict(tmp_path)[0], sd)
    # rewriting with fewer shards leaves no stale files behind
    save_state_dict(tmp_path, sd, CONFIG)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    _assert_same(load_state_dict(tmp_path)[0], sd)


def test_non_contiguous_and_dtype_cast(tmp_path):
    sd = {"model.layers.0.self_attn.o_proj.weight": torch.randn(40, 30).t(), "model.layers.0.mlp.gate.weight": torch.randn(4, 8)}
    save_state_dict(tmp_path, sd, {"num_hidden_layers": 1})
    loaded, _ = load_state_dict(tmp_path)
    assert torch.equal(loaded["model.layers.0.self_attn.o_proj.weight"], sd["model.layers.0.self_attn.o_proj.weight"])
    cast, _ = load_state_dict(tmp_path, dtype=torch.bfloat16)
    assert cast["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert cast["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # router stays fp32


@pytest.mark.parametrize("in_config", [True, False])
def test_tied_weights(tmp_path, in_config):
    emb = torch.randn(50, 16)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.randn(16), "lm_head.weight": emb}
    cfg = {"num_hidden_layers": 0, "tie_word_embeddings": in_config}
    index = save_state_dict(tmp_path, sd, cfg)
    assert "lm_head.weight" not in index["weight_map"]
    loaded, _ = load_state_dict(tmp_path)
    assert torch.equal(loaded["lm_head.weight"], emb)
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]


def test_fp8_save_load(tmp_path):
    sd = tiny_state_dict(torch.bfloat16)
    save_state_dict(tmp_path, sd, CONFIG, fp8=True, max_shard_bytes=50_000)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == FP8_QUANTIZATION_CONFIG

    def ref_q(w):
        return r1x.quant_fp8_per_block(w, 128)

    # as stored: e4m3 weights with [ceil(N/128), ceil(K/128)] fp32 scales (DeepSeek-V3's layout)
    raw, raw_cfg = load_state_dict(tmp_path, dequantize=False, fuse_routed_experts=False)
    assert raw_cfg["quantization_config"] == FP8_QUANTIZATION_CONFIG
    for k, v in sd.items():
        if v.dim() == 2 and is_fp8_quantized_weight(k):
            q, s = ref_q(v)
            assert raw[k].dtype == E4M3 and raw[k + "_scale_inv"].dtype == torch.float32
            assert raw[k + "_scale_inv"].shape == (-(-v.shape[0] // 128), -(-v.shape[1] // 128))
            assert torch.equal(raw[k].view(torch.uint8), q.view(torch.uint8)), k
            assert torch.equal(raw[k + "_scale_inv"], s), k
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.0.input_layernorm.weight"):
        assert torch.equal(raw[k], sd[k]) and k + "_scale_inv" not in raw
    g1 = raw["model.layers.1.mlp.experts.1.gate_proj.weight"]
    assert g1.dtype == E4M3 and raw["model.layers.1.mlp.experts.1.gate_proj.weight_scale_inv"].shape == (1, 2)

    # dequantized: exactly the per-block quantized values, in the config's dtype
    loaded, cfg2 = load_state_dict(tmp_path)
    assert "quantization_config" not in cfg2
    for k, v in sd.items():
        if is_fp8_quantized_weight(k) and v.dim() == 2:
            expect = r1x.dequant_fp8(*ref_q(v), (128, 128)).to(torch.bfloat16)
            assert loaded[k].dtype == torch.bfloat16
            assert torch.equal(loaded[k], expect), k
        elif not is_fp8_quantized_weight(k):
            assert torch.equal(loaded[k], v), k
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
    for j in range(gu.shape[0]):  # gate and up quantized separately, as per-expert weights
        for rows in (slice(0, 128), slice(128, 256)):
            expect = r1x.dequant_fp8(*ref_q(gu[j, rows]), (128, 128)).to(torch.bfloat16)
            assert torch.equal(loaded["model.layers.1.mlp.experts.gate_up_proj"][j, rows], expect)
    f32, _ = load_state_dict(tmp_path, dtype=torch.float32)
    k = "model.layers.0.self_attn.q_b_proj.weight"
    assert torch.equal(f32[k], r1x.dequant_fp8(*ref_q(sd[k]), (128, 128)))

    # fused FP8 experts (r1x.nn.MoEExperts' names) when not dequantized
    fused, _ = load_state_dict(tmp_path, dequantize=False)
    q = fused["model.layers.1.mlp.experts.gate_up_proj"]
    s = fused["model.layers.1.mlp.experts.gate_up_proj_scale_inv"]
    assert q.dtype == E4M3 and q.shape == gu.shape and s.shape == (gu.shape[0], 2, 2)
    assert torch.equal(r1x.dequant_fp8(q, s, (128, 128)).to(torch.bfloat16), loaded["model.layers.1.mlp.experts.gate_up_proj"])
    assert fused["model.layers.1.mlp.experts.down_proj_scale_inv"].shape == (gu.shape[0], 2, 1)

    # an already-quantized state dict is written through unchanged
    save_state_dict(tmp_path / "again", fused, raw_cfg)
    again, _ = load_state_dict(tmp_path / "again", dequantize=False)
    for k in fused:
        assert torch.equal(again[k].view(torch.uint8) if again[k].dtype == E4M3 else again[k],
                           fused[k].view(torch.uint8) if fused[k].dtype == E4M3 else fused[k]), k


def test_fp8_unaligned_experts_need_dequantize(tmp_path):
    sd = tiny_state_dict(torch.float32, inter=96)
    save_state_dict(tmp_path, sd, CONFIG, fp8=True)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        load_state_dict(tmp_path, dequantize=False)
    raw, _ = load_state_dict(tmp_path, dequantize=False, fuse_routed_experts=False)
    assert raw["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == E4M3
    assert load_state_dict(tmp_path)[0]["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 192, 160)


def test_mtp_keys_and_mapping(tmp_path):
    sd = tiny_state_dict(torch.float32, layers=3)  # layer 2 plays the MTP module's decoder layer
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        sd["model.layers.2." + name] = torch.randn(160)
    sd["model.layers.2.eh_proj.weight"] = torch.randn(160, 320)
    sd["model.layers.2.shared_head.head.weight"] = torch.randn(50, 160)
    cfg = dict(CONFIG, num_nextn_predict_layers=1)
    assert not is_fp8_quantized_weight("model.layers.2.eh_proj.weight")
    save_state_dict(tmp_path, sd, cfg, fp8=True)
    ck = load_state_dict(tmp_path, dtype=torch.float32)
    sd2, cfg2 = ck
    expected = sorted(k for k in sd2 if k.startswith("model.layers.2."))
    assert sorted(ck.mtp_keys) == expected and ck.num_mtp_layers == 1
    assert sorted(mtp_keys(sd2, cfg2)) == expected
    assert "model.layers.2.mlp.experts.gate_up_proj" in expected

    for prefix in ("mtp.{i}.", lambda i: f"model.mtp_layers.{i}."):
        main, mtp = split_mtp_state_dict(sd, 2, prefix)
        first = prefix(0) if callable(prefix) else "mtp.0."
        assert all(k.startswith(first) for k in mtp) and len(mtp) == len(expected)
        assert not mtp_keys(main, 2)
        assert mtp[first + "eh_proj.weight"] is sd["model.layers.2.eh_proj.weight"]
        merged = merge_mtp_state_dict(main, mtp, {"num_hidden_layers": 2}, prefix)
        assert sorted(merged) == sorted(sd)


def test_errors_name_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        load_state_dict(tmp_path)
    sd = tiny_state_dict(torch.float32)
    save_state_dict(tmp_path / "ck", sd, CONFIG, max_shard_bytes=10**5)
    shards = sorted(f for f in os.listdir(tmp_path / "ck") if f.startswith("model-"))
    os.remove(tmp_path / "ck" / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1].replace(".", r"\.")):
        load_state_dict(tmp_path / "ck")

    bad = tmp_path / "bad"
    bad.mkdir()
    q, s = r1x.quant_fp8_per_block(torch.randn(8, 8))
    save_file({"model.layers.0.self_attn.o_proj.weight": q}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight.*weight_scale_inv"):
        load_state_dict(bad)
    save_file({"x.weight_scale_inv": s}, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"x\.weight_scale_inv.*x\.weight"):
        load_state_dict(bad)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        save_state_dict(tmp_path / "x", {"a": torch.ones(1)}, None, max_shard_bytes="lots")


# --- transformers interop --------------------------------------------------------------------

def _tiny_hf_model(tie=False):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=120, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
        topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # make the router bias non-trivial so it is really compared
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_()
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_loads_transformers_checkpoint(tmp_path, tie):
    model = _tiny_hf_model(tie)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ck = load_state_dict(tmp_path)
    sd, cfg = ck
    ref = model.state_dict()
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert cfg["model_type"] == "deepseek_v3" and cfg["num_hidden_layers"] == 2
    # transformers announces an MTP layer in the config but writes no MTP weights
    assert cfg["num_nextn_predict_layers"] == 1 and ck.mtp_keys == [] and ck.num_mtp_layers == 0


def test_transformers_loads_r1x_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _tiny_hf_model()
    sd = model.state_dict()
    save_state_dict(tmp_path, sd, model.config.to_dict(), max_shard_bytes=40_000)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = torch.randint(0, 120, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
