"""FP8 quantization and the FP8 block-scaled GEMM (DESIGN.md 3.1-3.2) against float64 /
plain-PyTorch references, on every CPU ISA level this machine has, and on CUDA when present."""

import pytest
import torch
from torch.library import opcheck

import r1x
from r1x import reference as ref
from r1x.testing import assert_raises_naming, calc_diff, fp8_gemm_error_bound, random_fp8, random_scales, scaled_randn

FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t):
    """The bit pattern of each element, every NaN mapped to one pattern: NaN payloads are
    device-specific (x86 division keeps the input's NaN, CUDA's returns 0x7fffffff), and the
    contract is "NaN stays NaN"; every other value is compared bit for bit."""
    if t.dtype == FP8:
        return torch.where(torch.isnan(t.float()), 0x7F, t.view(torch.uint8).int())
    return torch.where(torch.isnan(t), 0x7FC00000, t.view(torch.int32))


def assert_bit_equal(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    mismatch = (bits(actual) != bits(expected)).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.shape[0]} of {actual.numel()} differ, first at {mismatch[0].tolist()}: "
        f"{actual[tuple(mismatch[0])]} vs {expected[tuple(mismatch[0])]}"
    )


# ----------------------------------------------------------------------------------------------
# sample inputs
# ----------------------------------------------------------------------------------------------
def activation_samples(device, gen):
    """(x, group_size) pairs: odd row counts, several groups, every float dtype, edge values."""
    out = []
    for dtype in FLOAT_DTYPES:
        for shape, group in [((1, 128), 128), ((3, 256), 128), ((129, 384), 128), ((2, 5, 128), 128),
                             ((7, 96), 32), ((4, 64), 64), ((5, 40), 8), ((0, 256), 128), ((3, 0), 128)]:
            x = scaled_randn(shape, group=group, dtype=dtype, generator=gen) if 0 not in shape else torch.empty(shape, dtype=dtype)
            out.append((x.to(device), group))
    # edge values: a zero group, subnormal-range values next to a large one, exact ties, 448 and beyond
    x = scaled_randn((6, 256), generator=gen)
    x[0, :128] = 0
    x[1, :128] = torch.randn(128, generator=gen) * 1e-6
    x[1, 5] = 300.0
    x[2, :128] = torch.arange(128) * 0.0625 - 4  # ties at e4m3 rounding boundaries after scaling
    x[3, 128:] = 1e30
    x[3, 130] = -1e30
    x[4, 128:] = torch.randn(128, generator=gen) * 1e-20  # amax below 1e-4: scale floor
    out.append((x.to(device), 128))
    # non-contiguous input
    y = scaled_randn((256, 9), generator=gen).t()
    out.append((y.to(device), 128))
    return out


def weight_samples(device, gen):
    out = []
    for dtype in FLOAT_DTYPES:
        for shape in [(128, 128), (1, 1), (200, 300), (257, 129), (64, 512), (0, 128), (3, 0)]:
            w = scaled_randn(shape, dtype=dtype, generator=gen) if 0 not in shape else torch.empty(shape, dtype=dtype)
            out.append(w.to(device))
    w = scaled_randn((300, 260), generator=gen)
    w[:128, :128] = 0
    w[128:256, 128:256] *= 1e-7
    out.append(w.to(device))
    return out


def gemm_samples(device, gen):
    """(a, a_scale, b, b_scale): scales that vary by 10^±4 between K blocks and N blocks (a
    kernel applying one scale per row or per output fails), partial last N block, odd M and N;
    M on both sides of the CPU kernels' switches (8 / 9 rows, 16-row vectors, 64-row panels,
    256-row tiles) and N over several tiles (the next tile's weights are prefetched)."""
    out = []
    for m, n, k in [(1, 1, 128), (2, 33, 256), (3, 7, 256), (16, 128, 384), (129, 200, 512), (33, 300, 1024),
                    (5, 64, 128), (64, 129, 1152), (5, 40, 4224), (0, 16, 256), (4, 0, 128), (8, 70, 256),
                    (9, 300, 256), (70, 520, 384), (300, 260, 256)]:
        a, b = random_fp8((m, k), generator=gen), random_fp8((n, k), generator=gen)
        sa = random_scales((m, k // 128), generator=gen)
        sb = random_scales(((n + 127) // 128, k // 128), generator=gen)
        out.append(tuple(t.to(device) for t in (a, sa, b, sb)))
    return out


# ----------------------------------------------------------------------------------------------
# quantization
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quant_per_token_group_matches_reference(device, cpu_isa, gen, ue8m0):
    for x, group in activation_samples(device, gen):
        q, s = r1x.quant_fp8_per_token_group(x, group, ue8m0)
        q_ref, s_ref = ref.quant_fp8_per_token_group(x.cpu(), group, ue8m0)
        assert_bit_equal(s.cpu(), s_ref)
        assert_bit_equal(q.cpu(), q_ref)
        if ue8m0 and s.numel():
            mant, _ = torch.frexp(s)
            assert torch.all(mant == 0.5), "ue8m0 scales must be powers of two"


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quant_per_block_matches_reference(device, cpu_isa, gen, ue8m0):
    for w in weight_samples(device, gen):
        q, s = r1x.quant_fp8_per_block(w, 128, ue8m0)
        q_ref, s_ref = ref.quant_fp8_per_block(w.cpu(), 128, ue8m0)
        assert s.shape == ((w.shape[0] + 127) // 128, (w.shape[1] + 127) // 128)
        assert_bit_equal(s.cpu(), s_ref)
        assert_bit_equal(q.cpu(), q_ref)


def test_quant_per_block_other_block_sizes(device, cpu_isa, gen):
    w = scaled_randn((70, 90), group=16, generator=gen).to(device)
    for bs in (1, 16, 64, 200):
        q, s = r1x.quant_fp8_per_block(w, bs)
        q_ref, s_ref = ref.quant_fp8_per_block(w.cpu(), bs)
        assert_bit_equal(s.cpu(), s_ref)
        assert_bit_equal(q.cpu(), q_ref)


def test_quant_roundtrip_error_is_within_e4m3_precision(device, gen):
    x = scaled_randn((33, 512), generator=gen).to(device)
    q, s = r1x.quant_fp8_per_token_group(x)
    xr = r1x.dequant_fp8(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in the normal range
    big = x.abs() > s.repeat_interleave(128, -1) * 2**-6 * 1.01
    rel = ((xr - x).abs() / x.abs())[big]
    assert rel.max() <= 2**-4 + 1e-7
    assert calc_diff(xr, x) < 2e-3


def test_quant_nan_and_inf_follow_reference(device, cpu_isa, gen):
    x = torch.randn(4, 256, generator=gen)
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    x[2, 7] = -float("inf")
    x = x.to(device)
    q, s = r1x.quant_fp8_per_token_group(x)
    q_ref, s_ref = ref.quant_fp8_per_token_group(x.cpu())
    assert_bit_equal(s.cpu(), s_ref)
    assert_bit_equal(q.cpu(), q_ref)
    assert torch.isnan(s[0, 0]) and not torch.isnan(s[0, 1])


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, 32), (16, 8)])
def test_dequant_matches_reference(device, cpu_isa, gen, block):
    for shape in [(1, 128), (3, 256), (129, 300), (2, 3, 257), (0, 128), (5, 0)]:
        q = random_fp8(shape, generator=gen)
        sshape = list(shape)
        sshape[-1] = (shape[-1] + block[1] - 1) // block[1]
        sshape[-2] = (shape[-2] + block[0] - 1) // block[0]
        s = random_scales(sshape, generator=gen)
        out = r1x.dequant_fp8(q.to(device), s.to(device), block)
        assert out.dtype == torch.float32
        assert_bit_equal(out.cpu(), ref.dequant_fp8(q, s, block))


def test_dequant_1d(device, gen):
    q = random_fp8((300,), generator=gen)
    s = random_scales((3,), generator=gen)
    assert_bit_equal(r1x.dequant_fp8(q.to(device), s.to(device)).cpu(), ref.dequant_fp8(q, s))


def test_dequant_nan_pattern(device):
    q = torch.tensor([0x7F, 0xFF, 0x7E, 0x01, 0x81] + [0] * 123, dtype=torch.uint8).view(FP8)
    out = r1x.dequant_fp8(q[None].to(device), torch.ones(1, 1, device=device)).cpu()[0]
    assert torch.isnan(out[0]) and torch.isnan(out[1])
    assert out[2] == 448 and out[3] == 2**-9 and out[4] == -(2**-9)


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_float64_reference(device, cpu_isa, gen, out_dtype):
    for a, sa, b, sb in gemm_samples(device, gen):
        out = r1x.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype)
        assert out.shape == (a.shape[0], b.shape[0]) and out.dtype == out_dtype
        expected = ref.fp8_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), out_dtype=torch.float64)
        if out.numel() == 0:
            continue
        got = out.cpu().double()
        assert torch.isfinite(got).all()
        # per element: the summation error of the device's kernels relative to the sum of the
        # terms' magnitudes (r1x.testing.FP8_GEMM_EPS: fp32 on the CPU, Hopper's FP8 tensor-core
        # accumulation on CUDA), plus one rounding to out_dtype
        bound = fp8_gemm_error_bound(a, sa, b, sb, device, out_dtype)
        assert ((got - expected).abs() <= bound).all()
        if out_dtype == torch.float32 and device == "cpu" and got.numel() >= 256:
            # far below bf16 rounding: calc_diff ~1e-14 where bf16 output gives ~1e-6 (on a
            # handful of outputs a single cancellation dominates the metric: the bound covers it)
            assert calc_diff(got, expected) < 1e-11


def test_fp8_gemm_far_more_accurate_than_bf16_matmul(device, cpu_isa, gen):
    """The error bound relative to what plain PyTorch achieves: dequantizing to bf16 and using
    torch's matmul errs by ~bf16 rounding; fp8_gemm must be orders of magnitude closer."""
    m, n, k = 64, 256, 2048
    a, b = random_fp8((m, k), generator=gen), random_fp8((n, k), generator=gen)
    sa, sb = random_scales((m, k // 128), generator=gen), random_scales((2, k // 128), generator=gen)
    exact = ref.fp8_gemm(a, sa, b, sb, out_dtype=torch.float64)
    torch_bf16 = ref.dequant_fp8(a, sa).bfloat16() @ ref.dequant_fp8(b, sb, (128, 128)).bfloat16().T
    ours = r1x.fp8_gemm(a.to(device), sa.to(device), b.to(device), sb.to(device), torch.float32).cpu()
    # fp32 accumulation on the CPU; on Hopper ~14-bit accumulation inside each 128-wide K block
    # (r1x.testing.FP8_GEMM_EPS), still well below the bf16 matmul's error
    assert calc_diff(ours, exact) < (1e-4 if device == "cpu" else 0.1) * calc_diff(torch_bf16, exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_cuda_matches_cpu_kernel(gen, out_dtype):
    """The same quantized operands through the CPU and the CUDA kernels: the two results differ
    by no more than the two devices' error bounds together."""
    for a, sa, b, sb in gemm_samples("cpu", gen):
        cpu = r1x.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype).double()
        cuda = r1x.fp8_gemm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), out_dtype=out_dtype).cpu().double()
        bound = fp8_gemm_error_bound(a, sa, b, sb, "cuda", out_dtype) + fp8_gemm_error_bound(a, sa, b, sb, "cpu", out_dtype)
        assert ((cuda - cpu).abs() <= bound).all(), (a.shape, b.shape)


def test_fp8_gemm_one_scale_per_row_is_wrong(gen):
    """Guards the test data itself: collapsing the K-block scales must be detectably wrong."""
    a, sa, b, sb = gemm_samples("cpu", gen)[4]
    exact = ref.fp8_gemm(a, sa, b, sb, out_dtype=torch.float64)
    wrong = ref.fp8_gemm(a, sa[:, :1].expand_as(sa).contiguous(), b, sb, out_dtype=torch.float64)
    abs_terms = ref.fp8_gemm(a.float().abs().to(FP8), sa, b.float().abs().to(FP8), sb, out_dtype=torch.float64)
    # per element, against the bound the kernels must meet (2e-6 * abs_terms): calc_diff alone can
    # be dominated by the one row whose scales happen to be largest in its first K block
    violated = (wrong - exact).abs() > 1e-3 * abs_terms
    assert violated.double().mean() > 0.5


def test_fp8_gemm_k_zero_and_nan_inputs(device):
    a = torch.empty(3, 0, dtype=FP8, device=device)
    out = r1x.fp8_gemm(a, torch.empty(3, 0, device=device), torch.empty(5, 0, dtype=FP8, device=device),
                       torch.empty(1, 0, device=device))
    assert out.shape == (3, 5) and (out == 0).all()
    a = torch.ones(2, 128, device=device).to(FP8)
    a[0, 7] = float("nan")
    b = torch.ones(3, 128, device=device).to(FP8)
    out = r1x.fp8_gemm(a, torch.ones(2, 1, device=device), b, torch.ones(1, 1, device=device), torch.float32)
    assert torch.isnan(out[0]).all() and (out[1] == 128).all()


def test_fp8_gemm_end_to_end_from_float(device, cpu_isa, gen):
    x = torch.randn(17, 768, generator=gen).to(device)
    w = (torch.randn(300, 768, generator=gen) * 0.02).to(device)
    qx, sx = r1x.quant_fp8_per_token_group(x)
    qw, sw = r1x.quant_fp8_per_block(w)
    y = r1x.fp8_gemm(qx, sx, qw, sw, torch.float32)
    assert calc_diff(y, x @ w.T) < 2e-3  # e4m3 quantization error of both operands


def test_noncontiguous_gemm_inputs(device, gen):
    a = random_fp8((256, 10), generator=gen).to(device).t()
    sa = random_scales((2, 10), generator=gen).to(device).t()
    b = random_fp8((20, 256), generator=gen).to(device)[::2]
    sb = random_scales((1, 2), generator=gen).to(device)
    out = r1x.fp8_gemm(a, sa, b, sb, torch.float32).cpu().double()
    expected = ref.fp8_gemm(a.cpu(), sa.cpu(), b.cpu(), sb.cpu(), torch.float64)
    assert ((out - expected).abs() <= fp8_gemm_error_bound(a, sa, b, sb, device)).all()
    if device == "cpu":
        assert calc_diff(out, expected) < 1e-11


# ----------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, torch.ops
# ----------------------------------------------------------------------------------------------
# torch.allclose has no float8 kernel on the CPU, so opcheck's test_schema cannot check ops
# that take e4m3 inputs (it compares inputs before and after the call); the others run, and
# test_no_mutation_no_aliasing checks by hand what test_schema would.
FP8_OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_opcheck(device, gen):
    x = scaled_randn((5, 256), generator=gen).to(device)
    w = scaled_randn((130, 256), generator=gen).to(device)
    for ue8m0 in (False, True):  # float inputs: every opcheck test, test_schema included
        opcheck(torch.ops.r1x.quant_fp8_per_token_group.default, (x, 128, ue8m0))
        opcheck(torch.ops.r1x.quant_fp8_per_block.default, (w, 128, ue8m0))
    qx, sx = r1x.quant_fp8_per_token_group(x)
    qw, sw = r1x.quant_fp8_per_block(w)
    opcheck(torch.ops.r1x.dequant_fp8.default, (qx, sx, [1, 128]), test_utils=FP8_OPCHECK_UTILS)
    opcheck(torch.ops.r1x.dequant_fp8.default, (qw, sw, [128, 128]), test_utils=FP8_OPCHECK_UTILS)
    for odt in (torch.bfloat16, torch.float32):
        opcheck(torch.ops.r1x.fp8_gemm.default, (qx, sx, qw, sw, odt), test_utils=FP8_OPCHECK_UTILS)


def test_no_mutation_no_aliasing(device, gen):
    x = scaled_randn((5, 256), generator=gen).to(device)
    w = scaled_randn((130, 256), generator=gen).to(device)
    x0, w0 = x.clone(), w.clone()
    qx, sx = r1x.quant_fp8_per_token_group(x)
    qw, sw = r1x.quant_fp8_per_block(w)
    assert torch.equal(x, x0) and torch.equal(w, w0)
    inputs = [qx, sx, qw, sw]
    before = [t.view(torch.uint8).clone() if t.dtype == FP8 else t.clone() for t in inputs]
    outs = [r1x.dequant_fp8(qx, sx), r1x.dequant_fp8(qw, sw, (128, 128)), r1x.fp8_gemm(qx, sx, qw, sw)]
    for t, b in zip(inputs, before):
        assert torch.equal(t.view(torch.uint8) if t.dtype == FP8 else t, b)
    storages = {t.untyped_storage().data_ptr() for t in [x, w, *inputs]}
    for o in outs:
        assert o.untyped_storage().data_ptr() not in storages


def test_torch_compile_fullgraph(device, gen):
    def f(x, w):
        qx, sx = r1x.quant_fp8_per_token_group(x)
        qw, sw = r1x.quant_fp8_per_block(w)
        y = r1x.fp8_gemm(qx, sx, qw, sw, out_dtype=torch.float32)
        return y, r1x.dequant_fp8(qw, sw, (128, 128))

    x = scaled_randn((9, 384), generator=gen).to(device)
    w = scaled_randn((200, 384), generator=gen).to(device)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (9, 3, 17):  # several M with dynamic shapes
        xm = x[:m].contiguous()
        y, wd = compiled(xm, w)
        y_e, wd_e = f(xm, w)
        assert torch.equal(y, y_e) and torch.equal(wd, wd_e)


def test_torch_ops_namespace(device, gen):
    x = scaled_randn((2, 128), generator=gen).to(device)
    q1, s1 = torch.ops.r1x.quant_fp8_per_token_group(x)
    q2, s2 = r1x.quant_fp8_per_token_group(x)
    assert torch.equal(s1, s2) and torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))
    out = torch.ops.r1x.fp8_gemm(q1, s1, q1, torch.ones(1, 1, device=device))  # default out_dtype
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# bad input: every argument of every op, wrong dtype / rank / size / device
# ----------------------------------------------------------------------------------------------
_raises = assert_raises_naming


def test_bad_input_quant(device):
    x = torch.randn(4, 256, device=device)
    _raises(lambda: r1x.quant_fp8_per_token_group(x.to(torch.int32)), "`x`", "float32")
    _raises(lambda: r1x.quant_fp8_per_token_group(x.to(FP8)), "`x`")
    _raises(lambda: r1x.quant_fp8_per_token_group(x.double()), "`x`")
    _raises(lambda: r1x.quant_fp8_per_token_group(torch.tensor(1.0, device=device)), "`x`")
    _raises(lambda: r1x.quant_fp8_per_token_group(x[:, :200]), "`group_size`", "200")
    _raises(lambda: r1x.quant_fp8_per_token_group(x, 0), "`group_size`")
    _raises(lambda: r1x.quant_fp8_per_token_group(x, -128), "`group_size`")
    _raises(lambda: r1x.quant_fp8_per_block(x.to(torch.int64)), "`w`")
    _raises(lambda: r1x.quant_fp8_per_block(x[0]), "`w`", "2-D")
    _raises(lambda: r1x.quant_fp8_per_block(x[None]), "`w`", "2-D")
    _raises(lambda: r1x.quant_fp8_per_block(x, 0), "`block_size`")


def test_bad_input_dequant(device):
    q = torch.randn(4, 256, device=device).to(FP8)
    s = torch.ones(4, 2, device=device)
    _raises(lambda: r1x.dequant_fp8(q.float(), s), "`q`", "float8_e4m3fn")
    _raises(lambda: r1x.dequant_fp8(q, s.double()), "`scale`", "float32")
    _raises(lambda: r1x.dequant_fp8(q, s[:, :1]), "`scale`", "[4, 2]")
    _raises(lambda: r1x.dequant_fp8(q, s[0]), "`scale`")
    _raises(lambda: r1x.dequant_fp8(q, s, (128, 128)), "`scale`", "[1, 2]")
    _raises(lambda: r1x.dequant_fp8(q, s, (0, 128)), "`block`")
    _raises(lambda: r1x.dequant_fp8(q, s, (1, -1)), "`block`")
    _raises(lambda: r1x.dequant_fp8(q[0, 0], s), "`q`")
    _raises(lambda: r1x.dequant_fp8(q, s.to("meta")), "`scale`")


def test_bad_input_gemm(device):
    a = torch.randn(4, 256, device=device).to(FP8)
    sa = torch.ones(4, 2, device=device)
    b = torch.randn(130, 256, device=device).to(FP8)
    sb = torch.ones(2, 2, device=device)
    g = r1x.fp8_gemm
    _raises(lambda: g(a.bfloat16(), sa, b, sb), "`a`", "float8_e4m3fn")
    _raises(lambda: g(a, sa, b.to(torch.float8_e5m2), sb), "`b`", "float8_e4m3fn")
    _raises(lambda: g(a, sa.half(), b, sb), "`a_scale`", "float32")
    _raises(lambda: g(a, sa, b, sb.double()), "`b_scale`", "float32")
    _raises(lambda: g(a[None], sa, b, sb), "`a`", "2-D")
    _raises(lambda: g(a, sa, b[0], sb), "`b`", "2-D")
    _raises(lambda: g(a, sa, b[:, :128], sb), "`b`", "K")
    _raises(lambda: g(a[:, :200], sa, b[:, :200], sb), "multiple of 128", "200")
    _raises(lambda: g(a, sa[:, :1], b, sb), "`a_scale`", "[4, 2]")
    _raises(lambda: g(a, sa[:3], b, sb), "`a_scale`")
    _raises(lambda: g(a, sa, b, sb[:1]), "`b_scale`", "[2, 2]")
    _raises(lambda: g(a, sa, b, sb[:, None]), "`b_scale`")
    _raises(lambda: g(a, sa, b, sb, out_dtype=torch.float16), "`out_dtype`")
    _raises(lambda: g(a, sa.to("meta"), b, sb), "`a_scale`")
    _raises(lambda: g(a, sa, b.to("meta"), sb), "`b`")
    _raises(lambda: g(a, sa, b, sb.to("meta")), "`b_scale`")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bad_input_mixed_cpu_cuda():
    a = torch.randn(4, 256).to(FP8)
    sa, sb = torch.ones(4, 2), torch.ones(1, 2)
    _raises(lambda: r1x.fp8_gemm(a, sa, a.cuda(), sb), "`b`")
    _raises(lambda: r1x.fp8_gemm(a.cuda(), sa, a.cuda(), sb.cuda()), "`a_scale`")
    _raises(lambda: r1x.dequant_fp8(a.cuda(), sa), "`scale`")
