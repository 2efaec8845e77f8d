"""DeepSeekForCausalLM.save_pretrained / from_pretrained: the HF DeepseekV3 checkpoint layout,
against transformers' own checkpoints, round trips (MTP modules, sharding, bf16), FP8 weights."""

import warnings

import pytest
import torch

import r1x
from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
from r1x.model import checkpoint
from r1x.testing import calc_diff

from test_model import randomize


def tiny(**kw):
    return DeepSeekConfig.preset("tiny", **kw)


def made(gen, **kw):
    model = DeepSeekForCausalLM(tiny(**kw)).eval()
    randomize(model, gen)
    return model


def test_loads_a_transformers_checkpoint(gen, tmp_path):
    """A tiny random checkpoint written by transformers loads, and its logits agree; its config
    announces an MTP module without weights, so MTP is off, with a warning."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny(num_nextn_predict_layers=1)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg.to_dict())).eval()
    randomize(hf, gen)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning, match="MTP off"):
        model = DeepSeekForCausalLM.from_pretrained(tmp_path).eval()
    assert len(model.mtp) == 0 and model.dtype == hf.dtype
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=gen)
    with torch.no_grad():
        got, exp = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_is_exact(gen, tmp_path, dtype):
    model = made(gen, num_nextn_predict_layers=2).to(dtype)
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    index = checkpoint.load_state_dict(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # sharded
    assert index.num_mtp_layers == 2  # model.layers.{L}, {L+1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = DeepSeekForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    assert back.dtype == dtype and len(back.mtp) == 2
    exp_sd, got_sd = model.state_dict(), back.state_dict()
    assert exp_sd.keys() == got_sd.keys()
    for k in exp_sd:
        assert torch.equal(exp_sd[k], got_sd[k]), k
    ids = torch.randint(0, 256, (3, 9), generator=gen)
    with torch.no_grad():
        a, b = model(ids, labels=ids), back(ids, labels=ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    # the checkpoint's own dtype is the default
    assert DeepSeekForCausalLM.from_pretrained(tmp_path, mtp=False).dtype == model.config.dtype


def test_fp8_checkpoint(gen, tmp_path):
    """fp8=True stores the projections as e4m3 + weight_scale_inv; loading dequantizes them to
    exactly the block-quantized values; from_pretrained(fp8=True) runs FP8 inference."""
    model = made(gen, first_k_dense_replace=tiny().num_hidden_layers)  # dense: no routing flips
    model.save_pretrained(tmp_path, fp8=True)
    raw = checkpoint.load_state_dict(tmp_path, dequantize=False, fuse_routed_experts=False)[0]
    name = "model.layers.0.self_attn.o_proj.weight"
    assert raw[name].dtype == torch.float8_e4m3fn and raw[name + "_scale_inv"].dtype == torch.float32
    back = DeepSeekForCausalLM.from_pretrained(tmp_path).eval()
    w = model.state_dict()[name]
    torch.testing.assert_close(back.state_dict()[name], r1x.dequant_fp8(*r1x.quant_fp8_per_block(w), (128, 128)).to(w.dtype),
                               rtol=0, atol=0)
    ids = torch.randint(0, 256, (2, 7), generator=gen)
    with torch.no_grad():
        exp = model(ids).logits
        # e4m3 weights (about 2^-4 relative error each) through 3 layers; + e4m3 activations
        assert calc_diff(back(ids).logits, exp) < 2e-2
        assert calc_diff(DeepSeekForCausalLM.from_pretrained(tmp_path, fp8=True)(ids).logits, exp) < 4e-2


def test_bad_checkpoints(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match=str(tmp_path / "missing")):
        DeepSeekForCausalLM.from_pretrained(tmp_path / "missing")
