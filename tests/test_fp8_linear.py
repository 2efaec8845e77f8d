"""r1x.nn.FP8Linear against bf16/fp32 nn.Linear: outputs and gradients."""

import pytest
import torch
from torch import nn

import r1x
from r1x.nn import FP8Linear
from r1x.testing import calc_diff

# e4m3 has 3 mantissa bits: quantizing both operands gives calc_diff around 1e-3 against the
# unquantized product; a wrong scale or a transposition error gives calc_diff near 1.
FP8_DIFF = 3e-3


def pair(in_f, out_f, bias, dtype, device, gen):
    ref = nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(out_f, in_f, generator=gen).to(device, dtype) * in_f**-0.5)
        if bias:
            ref.bias.copy_(torch.randn(out_f, generator=gen).to(device, dtype))
    fp8 = FP8Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_f,out_f,bias", [(256, 384, True), (100, 200, False), (128, 1, True), (1024, 130, True)])
def test_forward_and_gradients_match_linear(device, gen, dtype, in_f, out_f, bias):
    ref, fp8 = pair(in_f, out_f, bias, dtype, device, gen)
    x = torch.randn(3, 7, in_f, generator=gen).to(device, dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), fp8(x2)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert calc_diff(y, y_ref) < FP8_DIFF
    g = torch.randn(y.shape, generator=gen).to(device, dtype)
    y_ref.backward(g)
    y.backward(g)
    assert calc_diff(x2.grad, x1.grad) < FP8_DIFF
    assert calc_diff(fp8.weight.grad, ref.weight.grad) < 1e-4  # bf16/fp32 matmul, not FP8
    if bias:
        assert calc_diff(fp8.bias.grad, ref.bias.grad) < 1e-5


def test_frozen_fp8(device, gen):
    ref, fp8 = pair(300, 260, True, torch.bfloat16, device, gen)
    q, s = r1x.quant_fp8_per_block(ref.weight.detach())
    frozen = FP8Linear.from_fp8(q, s, ref.bias.detach())
    assert frozen.is_fp8 and set(frozen.state_dict()) == {"weight", "weight_scale_inv", "bias"}
    x = torch.randn(5, 300, generator=gen).to(device, torch.bfloat16).requires_grad_()
    y = frozen(x)
    assert calc_diff(y, ref(x)) < FP8_DIFF
    y.sum().backward()  # grad w.r.t. input flows through the frozen weight
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).sum().backward()
    assert calc_diff(x.grad, x_ref.grad) < FP8_DIFF
    # freeze_fp8 gives the same layer
    fp8.freeze_fp8()
    assert torch.equal(fp8(x.detach()), frozen(x.detach()))


def test_from_linear_shares_parameters(device, gen):
    ref, _ = pair(200, 130, True, torch.float32, device, gen)
    fp8 = FP8Linear.from_linear(ref)
    assert fp8.weight is ref.weight and fp8.bias is ref.bias
    assert (fp8.in_features, fp8.out_features) == (200, 130) and set(fp8.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 200, generator=gen).to(device)
    assert calc_diff(fp8(x), ref(x)) < FP8_DIFF


def test_inference_cache_tracks_weight_updates(device, gen):
    _, fp8 = pair(256, 128, False, torch.float32, device, gen)
    x = torch.randn(4, 256, generator=gen).to(device)
    with torch.no_grad():
        y1 = fp8(x)
        fp8.weight.mul_(2)
        y2 = fp8(x)
    assert calc_diff(y2, 2 * y1) < 1e-10


def test_empty_batch_and_bad_input(device):
    fp8 = FP8Linear(256, 64, device=device)
    assert fp8(torch.randn(0, 256, device=device)).shape == (0, 64)
    with pytest.raises(ValueError, match="in_features"):
        fp8(torch.randn(3, 100, device=device))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        FP8Linear.from_fp8(torch.zeros(130, 256).to(torch.float8_e4m3fn), torch.ones(1, 2))


def test_torch_compile_training_step(device, gen):
    _, fp8 = pair(256, 192, True, torch.float32, device, gen)
    x = torch.randn(9, 256, generator=gen).to(device)

    def step(x):
        y = fp8(x)
        (y * y).mean().backward()
        return y

    y_eager = step(x)
    g_eager = fp8.weight.grad.clone()
    fp8.weight.grad = None
    y_comp = torch.compile(step, fullgraph=False)(x)
    assert torch.equal(y_comp, y_eager)
    assert torch.allclose(fp8.weight.grad, g_eager, rtol=1e-5, atol=1e-7)
    fwd = torch.compile(fp8, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(fwd(x), fp8(x))
