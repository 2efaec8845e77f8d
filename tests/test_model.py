"""r1x.model: DeepSeekConfig (presets, validation, config.json round trips) and
DeepSeekForCausalLM against transformers' DeepseekV3ForCausalLM (same state_dict keys, same
logits), packed batches against per-sequence runs, the losses against a hand computation, MTP
(causality, gradients), torch.compile, FP8 inference, and parameter counts on the meta device."""

import json

import pytest
import torch
import torch.nn.functional as F

from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
from r1x.testing import calc_diff


def tiny(**kw):
    return DeepSeekConfig.preset("tiny", **kw)


def randomize(model, gen):
    """Fresh parameters large enough that every layer matters: weights ~ N(0, 1/fan_in),
    norms ~ 1 + N(0, 0.1^2), routers' balancing bias ~ N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                v = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                v = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
            p.copy_(v.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def make_model(gen, **kw):
    model = DeepSeekForCausalLM(tiny(**kw))
    randomize(model, gen)
    return model


def close(got, exp, rtol=1e-4):
    atol = 1e-5 * max(exp.abs().max().item(), 1e-3)
    torch.testing.assert_close(got.double(), exp.double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def test_presets():
    v3 = DeepSeekConfig.preset("v3")
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.num_experts_per_tok) == (7168, 61, 256, 8)
    assert v3.rope_scaling["factor"] == 40 and v3.num_nextn_predict_layers == 1 and v3.qk_head_dim == 192
    lite = DeepSeekConfig.preset("v2-lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and lite.n_shared_experts == 2
    assert DeepSeekConfig.preset("tiny", num_hidden_layers=4).num_hidden_layers == 4
    assert DeepSeekConfig().hidden_size == 7168  # defaults: DeepSeek-V3's
    with pytest.raises(ValueError, match="`name`"):
        DeepSeekConfig.preset("huge")


def test_parameter_counts_on_meta_device():
    small = DeepSeekForCausalLM(DeepSeekConfig.preset("small"), device="meta")
    assert 80e6 < small.num_parameters() < 120e6
    v3 = DeepSeekForCausalLM(DeepSeekConfig.preset("v3"), device="meta")
    assert 670e9 < v3.num_parameters(include_mtp=False) < 672e9  # DeepSeek-V3's 671B
    lite = DeepSeekForCausalLM(DeepSeekConfig.preset("v2-lite"), device="meta")
    assert 15.6e9 < lite.num_parameters() < 15.8e9  # DeepSeek-V2-Lite's 15.7B


@pytest.mark.parametrize("field, value", [
    ("num_key_value_heads", 2), ("n_group", 3), ("topk_group", 3), ("num_experts_per_tok", 9),
    ("num_experts_per_tok", 5),  # > topk_group (1) x 4 experts per group
    ("hidden_size", 0), ("vocab_size", -1), ("num_attention_heads", 2.5), ("qk_rope_head_dim", 7),
    ("first_k_dense_replace", 4), ("q_lora_rank", 0), ("scoring_func", "relu"), ("hidden_act", "gelu"),
    ("routed_scaling_factor", 0.0), ("mtp_loss_weight", -1.0), ("aux_loss_alpha", float("nan")),
    ("rope_theta", 0), ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "yarn", "factor": 4.0}), ("eos_token_id", 264), ("pad_token_id", -1),
    ("torch_dtype", "float16"), ("num_nextn_predict_layers", -1), ("norm_topk_prob", 1),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny(**{field: value})


def test_config_dict_round_trip(tmp_path):
    c = DeepSeekConfig.preset("v3")
    d = c.to_dict()
    assert d["model_type"] == "deepseek_v3"
    back = DeepSeekConfig.from_dict(d)
    assert back.replace(extra={}) == c and back.to_dict() == d  # model_type, architectures kept in extra
    # transformers 5's spelling: rope_parameters, num_mtp_layers, dtype; unknown keys are kept
    hf = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta", "num_nextn_predict_layers",
                                                   "torch_dtype")}
    hf.update(rope_parameters={"rope_theta": 10000.0, **c.rope_scaling}, num_mtp_layers=1, dtype="bfloat16",
              quantization_config={"quant_method": "fp8"}, ep_size=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    c2 = DeepSeekConfig.from_json_file(tmp_path)
    assert c2.rope_scaling == c.rope_scaling and c2.rope_theta == 10000.0 and c2.num_nextn_predict_layers == 1
    assert c2.torch_dtype == "bfloat16" and c2.extra["quantization_config"] == {"quant_method": "fp8"}
    assert c2.to_dict()["ep_size"] == 1
    plain = DeepSeekConfig.from_dict({**tiny().to_dict(), "rope_parameters": {"rope_type": "default",
                                                                               "rope_theta": 5e4}})
    assert plain.rope_scaling is None and plain.rope_theta == 5e4


# ----------------------------------------------------------------------------------------------
# the model against transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["tiny", "yarn-no-qlora-2dense"])
def test_matches_transformers_deepseek_v3(gen, variant):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = {} if variant == "tiny" else dict(
        q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1, first_k_dense_replace=2,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 0.707,
                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
    cfg = tiny(**kw)
    hf_cfg = DeepseekV3Config(**cfg.to_dict())
    hf_cfg._attn_implementation = "eager"
    assert hf_cfg.num_hidden_layers == cfg.num_hidden_layers and hf_cfg.n_group == cfg.n_group
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    randomize(hf, gen)
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))

    ours = DeepSeekForCausalLM(cfg).eval()
    res = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all(k.startswith("mtp.") for k in res.missing_keys)  # transformers has no MTP
    main = DeepSeekForCausalLM(cfg, mtp=False)
    main.load_state_dict(hf.state_dict(), strict=True)  # the main model's keys are transformers' exactly
    assert set(main.state_dict()) == set(hf.state_dict())

    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=gen)
    with torch.no_grad():
        got = ours(ids).logits
        exp = hf(ids).logits
    assert got.shape == exp.shape == (2, 11, cfg.vocab_size)
    close(got, exp)
    # the loss follows transformers' labels convention
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        assert torch.allclose(ours(ids, labels=labels).lm_loss, hf(ids, labels=labels).loss, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# packing, losses, MTP
# ----------------------------------------------------------------------------------------------
def test_packed_equals_per_sequence(gen):
    model = make_model(gen).eval()
    lengths = [5, 1, 9, 3]
    seqs = [torch.randint(0, 256, (n,), generator=gen) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    packed = torch.cat(seqs)
    with torch.no_grad():
        out = model(packed, cu_seqlens=cu, labels=packed)
        assert out.logits.shape == (18, tiny().vocab_size) and len(out.mtp_logits) == 1
        for i, s in enumerate(seqs):
            ref = model(s[None], labels=s[None])
            close(out.logits[cu[i]:cu[i + 1]], ref.logits[0])
            close(out.mtp_logits[0][cu[i]:cu[i + 1]], ref.mtp_logits[0][0])
        # [B, S] is B packed sequences of S tokens
        ids = torch.randint(0, 256, (3, 6), generator=gen)
        close(model(ids).logits.reshape(18, -1), model(ids.reshape(-1), cu_seqlens=torch.arange(4,
              dtype=torch.int32) * 6).logits)


def test_losses_match_hand_computation(gen):
    model = make_model(gen).eval()
    ids = torch.randint(0, 256, (2, 10), generator=gen)
    labels = ids.clone()
    labels[1, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    lg, mlg = out.logits.double(), out.mtp_logits[0].double()
    lm = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    mtp = F.cross_entropy(mlg[:, :-2].reshape(-1, mlg.shape[-1]), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss.double(), lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss.double(), mtp, rtol=1e-5, atol=1e-6)
    assert out.aux_loss.item() == 0  # eval mode: no balance loss
    torch.testing.assert_close(out.loss.double(), lm + 0.3 * mtp, rtol=1e-5, atol=1e-6)
    # packed: the shift never crosses a boundary
    with torch.no_grad():
        cu = torch.tensor([0, 10, 20], dtype=torch.int32)
        p = model(ids.reshape(-1), cu_seqlens=cu, labels=labels.reshape(-1))
    torch.testing.assert_close(p.loss, out.loss, rtol=1e-5, atol=1e-6)
    # no valid target: 0, not NaN
    with torch.no_grad():
        assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0


def test_mtp_sees_only_the_next_token(gen):
    """Depth 1 at position t uses tokens <= t + 1 only."""
    model = make_model(gen).eval()
    ids = torch.randint(0, 256, (1, 12), generator=gen)
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 256
    with torch.no_grad():
        a = model(ids, labels=ids).mtp_logits[0]
        b = model(changed, labels=changed).mtp_logits[0]
    torch.testing.assert_close(a[0, :6], b[0, :6], rtol=0, atol=0)
    assert not torch.allclose(a[0, 6], b[0, 6])


def test_backward_reaches_every_parameter(gen):
    model = make_model(gen, num_nextn_predict_layers=2).train()
    ids = torch.randint(0, 256, (2, 12), generator=gen)
    out = model(ids, labels=ids)
    moe_aux = sum(m.aux_loss for m in model.moe_layers())
    assert out.aux_loss.item() > 0 and torch.allclose(out.aux_loss, moe_aux)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss + out.aux_loss)
    assert len(model.mtp) == 2 and torch.isfinite(out.mtp_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    for name in ("mtp.1.eh_proj.weight", "mtp.0.enorm.weight", "mtp.1.shared_head.norm.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0


def test_bfloat16_model(gen):
    """A model runs in its config's dtype (torch_dtype); the losses are float32. Logits are
    compared on a dense model: with MoE layers, bf16 rounding may flip a near-tied routing choice
    of this tiny random model and change a token's experts (the MoE model is checked to run and
    train)."""
    n = tiny().num_hidden_layers
    for dense in (True, False):
        kw = {"first_k_dense_replace": n} if dense else {}
        ref = make_model(gen, **kw).eval()
        model = DeepSeekForCausalLM(tiny(torch_dtype="bfloat16", **kw)).eval()
        model.load_state_dict(ref.state_dict())
        assert model.dtype == torch.bfloat16
        if not dense:
            assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
        ids = torch.randint(0, 256, (2, 8), generator=gen)
        with torch.no_grad():
            got, exp = model(ids, labels=ids), ref(ids, labels=ids)
        assert got.logits.dtype == torch.bfloat16 and got.loss.dtype == torch.float32
        if dense:
            assert calc_diff(got.logits, exp.logits) < 1e-3
            assert abs(got.loss.item() - exp.loss.item()) < 0.02 * exp.loss.item()
        else:
            assert torch.isfinite(got.logits).all() and torch.isfinite(got.loss)
        model.train()(ids, labels=ids).loss.backward()


def test_bad_inputs():
    model = DeepSeekForCausalLM(tiny())
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        model(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        model(torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="`input_ids`"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`labels`"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(6, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# compile, FP8
# ----------------------------------------------------------------------------------------------
def test_torch_compile(gen):
    model = make_model(gen).eval()
    ids = torch.randint(0, 256, (2, 7), generator=gen)
    compiled = torch.compile(model.forward, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, labels=ids)
        exp = model(ids, labels=ids)
    close(got.logits, exp.logits)
    torch.testing.assert_close(got.loss, exp.loss)


@pytest.mark.parametrize("dense", [True, False])
def test_fp8_inference(gen, dense):
    # dense: all 3 main layers dense (no routing to flip); else 1 dense + 2 MoE layers
    model = make_model(gen, **({"first_k_dense_replace": 3} if dense else {})).eval()
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    with torch.no_grad():
        exp = model(ids, labels=ids)
        model.to_fp8()
        got = model(ids, labels=ids)
    sd = model.state_dict()
    assert sd["model.layers.1.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.self_attn.q_a_proj.weight_scale_inv" in sd
    assert sd["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float32  # read by the absorbed decode
    assert sd["mtp.0.eh_proj.weight"].dtype == torch.float8_e4m3fn
    assert sd["mtp.0.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert sd["lm_head.weight"].dtype == torch.float32
    assert torch.isfinite(got.logits).all()
    # e4m3 keeps 3 mantissa bits: ~1e-3 per GEMM, ~15 GEMMs deep (measured 7e-3 dense; MoE
    # layers add routing flips, up to ~7e-2 on random weights)
    assert calc_diff(got.logits, exp.logits) < (2e-2 if dense else 1.5e-1)
    assert abs(got.loss.item() - exp.loss.item()) < 0.05 * exp.loss.item()


def test_fp8_training_master_weights(gen):
    model = make_model(gen).train().to_fp8(freeze=False)
    assert model.model.layers[1].self_attn.o_proj.weight.dtype == torch.float32  # master weights
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0
