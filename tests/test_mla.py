"""The MLA ops (DESIGN.md 3.4) against the float64 references in r1x.reference, on every CPU ISA
level and on CUDA when present: variable-length attention forward, backward (gradients of the
output and of the log-sum-exp), and absorbed decode over paged latent caches."""

import math

import pytest
import torch
from torch.library import opcheck

import r1x
from r1x import reference as ref
from r1x.testing import assert_raises_naming, calc_diff

from conftest import available_isas

OPS = torch.ops.r1x
# The MLA kernels exist at three levels (portable C++; AVX-512; amx: AVX-512 with the bf16
# decode on AMX tiles); avx2 runs the portable ones: one run each.
MLA_ISAS = [isa for isa in ("generic", "avx512", "amx") if isa in available_isas()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (elementwise rtol = atol, calc_diff bound) against a float64 reference computed from the same
# (rounded) inputs: the kernels accumulate in fp32 and round the result once to the dtype
TOL = {torch.float32: (2e-5, 1e-10), torch.bfloat16: (2e-2, 2e-5), torch.float16: (4e-3, 1e-6)}


# On CUDA every test runs three times: the default kernels (wgmma on sm_90a where they apply),
# R1X_MLA_NO_SM90=1 (the mma.sync kernels everywhere) and R1X_MLA_SIMT=1 (the CUDA-core kernels
# for every dtype), so each implementation is checked against the reference on every case.
CUDA_PATHS = {"cuda": {}, "cuda-no_sm90": {"R1X_MLA_NO_SM90": "1"}, "cuda-simt": {"R1X_MLA_SIMT": "1"}}


@pytest.fixture(params=["cpu"] + (list(CUDA_PATHS) if torch.cuda.is_available() else []))
def device(request, monkeypatch):
    """The device of the MLA tests ("cpu" or "cuda"), with the CUDA kernel path set (the
    kernels read R1X_MLA_NO_SM90 / R1X_MLA_SIMT at every call)."""
    for name in ("R1X_MLA_NO_SM90", "R1X_MLA_SIMT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CUDA_PATHS.get(request.param, {}).items():
        monkeypatch.setenv(name, value)
    return "cpu" if request.param == "cpu" else "cuda"


@pytest.fixture(params=MLA_ISAS)
def cpu_isa(request, device):
    if device != "cpu" and request.param != MLA_ISAS[-1]:
        pytest.skip("CPU ISA levels only matter on the CPU")
    with r1x.use_cpu_isa(request.param):
        yield request.param


def cu_of(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def attention_inputs(lens, h, dqk, dv, dtype, device, gen, requires_grad=False):
    t = sum(lens)
    q, k = (torch.randn(t, h, dqk, generator=gen).to(device, dtype) for _ in range(2))
    v = torch.randn(t, h, dv, generator=gen).to(device, dtype)
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, cu_of(lens, device)


def assert_close(got, exp, dtype, what):
    tol, bound = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), exp.double().cpu(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")
    assert calc_diff(got, exp) < bound, f"{what}: calc_diff {calc_diff(got, exp):.3e}"


def assert_lse(lse, lse_ref, what):
    lse, lse_ref = lse.double().cpu(), lse_ref.double().cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), f"{what}: -inf entries differ"
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[fin], lse_ref[fin], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# mla_attention
# ----------------------------------------------------------------------------------------------
ATTN_CASES = [
    # (seqlens, H, Dqk, Dv)
    ([1, 3, 64, 65, 0, 130], 3, 40, 24),  # block edges, an empty sequence, odd tails
    ([77, 5], 2, 192, 128),                 # DeepSeek-V3's head dims
    ([127, 128, 129, 1], 1, 192, 128),      # CUDA's 128-key tiles: edges
    ([200], 1, 17, 33),                     # Dv > Dqk, odd widths
    ([0, 0], 2, 8, 8),                      # T = 0 with sequences
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_mla_attention_matches_reference(device, cpu_isa, dtype, causal, case, gen):
    lens, h, dqk, dv = ATTN_CASES[case]
    q, k, v, cu = attention_inputs(lens, h, dqk, dv, dtype, device, gen)
    scale = None if case % 2 == 0 else 0.37
    out, lse = r1x.mla_attention_forward(q, k, v, cu, causal, scale)
    assert out.shape == (sum(lens), h, dv) and out.dtype == dtype and out.device == q.device
    assert lse.shape == (h, sum(lens)) and lse.dtype == torch.float32
    out_ref, lse_ref = ref.mla_attention(q.double(), k.double(), v.double(), cu, causal, scale, return_lse=True)
    assert_close(out, out_ref, dtype, "out")
    assert_lse(lse, lse_ref, "lse")
    torch.testing.assert_close(r1x.mla_attention(q, k, v, cu, causal, scale), out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mla_attention_gradients(device, cpu_isa, dtype, causal, gen):
    lens, h, dqk, dv = [1, 70, 0, 129], 2, 48, 40
    q, k, v, cu = attention_inputs(lens, h, dqk, dv, dtype, device, gen, requires_grad=True)
    out, lse = r1x.mla_attention_forward(q, k, v, cu, causal, 0.2)
    g_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    g_lse = torch.randn(lse.shape, generator=gen).to(device)
    grads = torch.autograd.grad([out, lse], [q, k, v], [g_out, g_lse])

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64, l64 = ref.mla_attention(q64, k64, v64, cu, causal, 0.2, return_lse=True)
    grads_ref = torch.autograd.grad([o64, l64], [q64, k64, v64], [g_out.double(), g_lse.double()])
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, gr, dtype, f"grad_{name}")

    # through the composite op and without a gradient for the lse
    grads = torch.autograd.grad(r1x.mla_attention(q, k, v, cu, causal, 0.2), [q, k, v], g_out)
    o64 = ref.mla_attention(q64, k64, v64, cu, causal, 0.2)
    grads_ref = torch.autograd.grad(o64, [q64, k64, v64], g_out.double())
    for name, g, gr in zip("qkv", grads, grads_ref):
        assert_close(g, gr, dtype, f"grad_{name} (out only)")


def test_mla_attention_strided_inputs(device, gen):
    """q, k, v as views of one packed projection (not contiguous) give the same result."""
    lens, h = [33, 64], 3
    t = sum(lens)
    qkv = torch.randn(t, h, 24 + 24 + 16, generator=gen).to(device)
    q, k, v = qkv[..., :24], qkv[..., 24:48], qkv[..., 48:]
    cu = cu_of(lens, device)
    out = r1x.mla_attention(q, k, v, cu)
    torch.testing.assert_close(out, r1x.mla_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu), rtol=0, atol=0)
    assert_close(out, ref.mla_attention(q.double(), k.double(), v.double(), cu), torch.float32, "out")


def test_mla_attention_empty(device):
    for lens in ([], [0], [0, 0, 0]):
        cu = cu_of(lens, device)
        q = torch.randn(0, 4, 16, device=device, requires_grad=True)
        k = torch.randn(0, 4, 16, device=device)
        v = torch.randn(0, 4, 8, device=device)
        out, lse = r1x.mla_attention_forward(q, k, v, cu)
        assert out.shape == (0, 4, 8) and lse.shape == (4, 0)
        out.sum().backward()
        assert q.grad.shape == q.shape


def test_mla_attention_large_scores_are_stable(device, cpu_isa, gen):
    """Scores in the thousands (a naive softmax overflows) stay finite and right: the online
    softmax subtracts the running max before exponentiating. (The fp32 rounding of such scores
    moves them by ~1e-3, so the tolerance on the output is that.)"""
    q, k, v, cu = attention_inputs([90, 7], 2, 32, 16, torch.float32, device, gen)
    q = q * 300
    out, lse = r1x.mla_attention_forward(q, k, v, cu)
    out_ref, lse_ref = ref.mla_attention(q.double(), k.double(), v.double(), cu, return_lse=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), out_ref.cpu(), rtol=1e-2, atol=5e-3)
    torch.testing.assert_close(lse.double().cpu(), lse_ref.cpu(), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# mla_decode
# ----------------------------------------------------------------------------------------------
def paged_cache(seqlens, d, block_size, dtype, device, gen, spare_blocks=3):
    """A cache holding each sequence's rows in randomly permuted blocks; every slot that holds no
    token is NaN, and block-table entries past a sequence's blocks are garbage (out of range)."""
    blocks = [math.ceil(n / block_size) for n in seqlens]
    max_blocks = max(blocks + [1]) + 1
    num_blocks = sum(blocks) + spare_blocks
    cache = torch.full((num_blocks, block_size, d), float("nan"), dtype=dtype)
    table = torch.full((len(seqlens), max_blocks), 10**6, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    used = 0
    for b, (n, nb) in enumerate(zip(seqlens, blocks)):
        table[b, :nb] = perm[used:used + nb]
        used += nb
        rows = torch.randn(n, d, generator=gen).to(dtype)
        for j in range(n):
            cache[table[b, j // block_size], j % block_size] = rows[j]
    lens = torch.tensor(seqlens, dtype=torch.int32)
    return cache.to(device), table.to(device), lens.to(device)


DECODE_CASES = [
    # (seqlens, Sq, H, D, dv, block_size)
    ([5, 0, 1, 130, 64], 1, 4, 72, 64, 16),
    ([5, 0, 1, 130, 64], 2, 4, 72, 64, 16),
    ([700, 3, 33], 2, 3, 40, 40, 1),    # block size 1, dv = D, several KV splits
    ([300, 2, 129], 3, 5, 576, 512, 64),  # DeepSeek-V3's widths, MTP-style Sq = 3
    ([1], 2, 16, 24, 8, 64),              # Sq > L: the first query sees nothing
    ([65, 0, 1, 200], 2, 64, 576, 512, 64),  # Sq * H > 32: CUDA's wgmma decode path
    ([4096, 7], 4, 9, 576, 512, 64),      # long context, small B: several KV splits (wgmma on CUDA)
    ([], 1, 2, 16, 8, 4),                 # B = 0
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_mla_decode_matches_reference(device, cpu_isa, dtype, causal, case, gen):
    seqlens, sq, h, d, dv, bs = DECODE_CASES[case]
    cache, table, lens = paged_cache(seqlens, d, bs, dtype, device, gen)
    q = torch.randn(len(seqlens), sq, h, d, generator=gen).to(device, dtype)
    scale = None if case % 2 else 0.11
    out, lse = r1x.mla_decode(q, cache, table, lens, dv, scale, causal)
    assert out.shape == (len(seqlens), sq, h, dv) and out.dtype == dtype and out.device == q.device
    assert lse.shape == (len(seqlens), h, sq) and lse.dtype == torch.float32
    out_ref, lse_ref = ref.mla_decode(q.double(), cache, table, lens, dv, scale, causal)
    assert torch.isfinite(out).all(), "NaN from an unused cache slot leaked into the output"
    assert_close(out, out_ref, dtype, "out")
    assert_lse(lse, lse_ref, "lse")


def test_mla_decode_equals_attention_over_the_cache(device, cpu_isa, gen):
    """Two kernels, one answer: decode of the last Sq queries over a paged cache equals
    mla_attention over the same rows (K = the cache row for every head, V its first dv)."""
    h, d, dv, n = 4, 48, 32, 150
    cache, table, lens = paged_cache([n], d, 16, torch.float32, device, gen)
    j = torch.arange(n, device=device)
    rows = cache[table[0, j // 16].long(), j % 16]  # [n, d]
    q_all = torch.randn(n, h, d, generator=gen).to(device)
    k = rows.unsqueeze(1).expand(n, h, d).contiguous()
    att = r1x.mla_attention(q_all, k, k[..., :dv].contiguous(), cu_of([n], device), True, 0.3)
    for sq in (1, 2, 5):
        out, _ = r1x.mla_decode(q_all[n - sq:].unsqueeze(0), cache, table, lens, dv, 0.3)
        torch.testing.assert_close(out[0], att[n - sq:], rtol=1e-5, atol=1e-5)


def test_mla_decode_has_no_backward(device):
    q = torch.randn(1, 1, 2, 8, device=device, requires_grad=True)
    cache = torch.randn(2, 4, 8, device=device)
    args = (cache, torch.tensor([[0, 1]], dtype=torch.int32, device=device),
            torch.tensor([5], dtype=torch.int32, device=device), 8)
    with pytest.raises(RuntimeError, match="mla_decode.*no backward.*torch.no_grad"):
        r1x.mla_decode(q, *args)
    with torch.no_grad():
        out, _ = r1x.mla_decode(q, *args)
    assert not out.requires_grad
    torch.testing.assert_close(out, r1x.mla_decode(q.detach(), *args)[0])


# ----------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------
def test_opcheck(device, gen):
    q, k, v, cu = attention_inputs([5, 0, 11], 2, 16, 8, torch.float32, device, gen, requires_grad=True)
    opcheck(OPS.mla_attention_forward.default, (q, k, v, cu, True, None))
    opcheck(OPS.mla_attention_forward.default, (q, k, v, cu, False, 0.5))
    opcheck(OPS.mla_attention.default, (q, k, v, cu, True, None))
    out, lse = r1x.mla_attention_forward(q, k, v, cu)
    g = torch.randn_like(out)
    args = (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach())
    opcheck(OPS.mla_attention_backward.default, args + (None, cu, True, None))
    opcheck(OPS.mla_attention_backward.default, args + (torch.randn_like(lse), cu, False, 0.3))
    cache, table, lens = paged_cache([9, 0, 4], 24, 4, torch.float32, device, gen)
    qd = torch.randn(3, 2, 3, 24, generator=gen).to(device)
    cache = cache.nan_to_num(0.0)  # opcheck compares outputs with allclose over every element
    opcheck(OPS.mla_decode.default, (qd, cache, table, lens, 16, None, True))


def test_torch_compile_fullgraph(device, gen):
    def attn(q, k, v, cu, w):
        return (r1x.mla_attention(q, k, v, cu) * w).sum(-1)

    def decode(q, cache, table, lens):
        out, lse = r1x.mla_decode(q, cache, table, lens, 16)
        return out * lse.transpose(1, 2).unsqueeze(-1).exp()

    compiled = torch.compile(attn, fullgraph=True, dynamic=True)
    for lens in ([9, 4], [17], [3, 3, 30]):
        q, k, v, cu = attention_inputs(lens, 2, 24, 16, torch.float32, device, gen, requires_grad=True)
        w = torch.randn(16, generator=gen).to(device)
        y, y_e = compiled(q, k, v, cu, w), attn(q, k, v, cu, w)
        torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(y.square().sum(), [q, k, v])
        g_e = torch.autograd.grad(y_e.square().sum(), [q, k, v])
        for a, b in zip(g, g_e):  # inductor fuses the backward's fp32 sums differently
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
    cdecode = torch.compile(decode, fullgraph=True)
    cache, table, lens = paged_cache([9, 0, 20], 24, 8, torch.float32, device, gen)
    qd = torch.randn(3, 1, 2, 24, generator=gen).to(device)
    torch.testing.assert_close(cdecode(qd, cache, table, lens), decode(qd, cache, table, lens))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
_raises = assert_raises_naming


def test_mla_attention_bad_input(device):
    q = torch.randn(10, 2, 16, device=device)
    k = torch.randn(10, 2, 16, device=device)
    v = torch.randn(10, 2, 8, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    f = r1x.mla_attention
    _raises(lambda: f(q.to(torch.int32), k, v, cu), "`q`", "float32, bfloat16 or float16")
    _raises(lambda: f(q, k.bfloat16(), v, cu), "`k`", "dtype of `q`")
    _raises(lambda: f(q, k, v.half(), cu), "`v`", "dtype of `q`")
    _raises(lambda: f(q[0], k, v, cu), "`q`", "3-D")
    _raises(lambda: f(q, k[:, :1], v, cu), "`k`", "[T, H, Dqk]")
    _raises(lambda: f(q, k[..., :8], v, cu), "`k`", "[T, H, Dqk]")
    _raises(lambda: f(q, k, v[:9], cu), "`v`", "[T, H, Dv]")
    _raises(lambda: f(q, k, v, cu.long()), "`cu_seqlens`", "int32")
    _raises(lambda: f(q, k, v, cu.view(1, 3)), "`cu_seqlens`", "1-D")
    _raises(lambda: f(q, k, v, cu[:0]), "`cu_seqlens`", "[B + 1]")
    _raises(lambda: f(q, k, v, cu, softmax_scale=float("inf")), "`softmax_scale`", "finite")
    _raises(lambda: f(torch.randn(3, 0, 16, device=device), k[:3, :0], v[:3, :0], cu[:1]), "`q`", "H >= 1")
    if device == "cpu":  # the offsets stay on the device on CUDA (reading them would sync)
        _raises(lambda: f(q, k, v, torch.tensor([1, 4, 10], dtype=torch.int32)), "`cu_seqlens`", "start at 0")
        _raises(lambda: f(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "`cu_seqlens`", "nondecreasing")
        _raises(lambda: f(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32)), "`cu_seqlens`", "end at T = 10")
        _raises(lambda: f(q, k, v, torch.tensor([0, 4, 11], dtype=torch.int32)), "`cu_seqlens`", "end at T = 10")
    else:
        _raises(lambda: f(q, k.cpu(), v, cu), "`k`", "one device")
        _raises(lambda: f(q, k, v, cu.cpu()), "`cu_seqlens`", "one device")
    out, lse = r1x.mla_attention_forward(q, k, v, cu)
    b = OPS.mla_attention_backward.default
    _raises(lambda: b(out.bfloat16(), q, k, v, out, lse, None, cu), "`grad_out`", "dtype of `q`")
    _raises(lambda: b(out[:5], q, k, v, out, lse, None, cu), "`grad_out`", "[T, H, Dv]")
    _raises(lambda: b(out, q, k, v, out[..., :4], lse, None, cu), "`out`", "[T, H, Dv]")
    _raises(lambda: b(out, q, k, v, out, lse.double(), None, cu), "`lse`", "float32")
    _raises(lambda: b(out, q, k, v, out, lse.T.contiguous(), None, cu), "`lse`", "[H, T]")
    _raises(lambda: b(out, q, k, v, out, lse, lse[:1], cu), "`grad_lse`", "[H, T]")


def test_mla_decode_bad_input(device):
    q = torch.randn(2, 1, 4, 24, device=device)
    cache = torch.randn(6, 4, 24, device=device)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device)
    lens = torch.tensor([5, 8], dtype=torch.int32, device=device)
    f = r1x.mla_decode
    _raises(lambda: f(q.to(torch.int32), cache, table, lens, 16), "`q`", "float32, bfloat16 or float16")
    _raises(lambda: f(q[0], cache, table, lens, 16), "`q`", "4-D")
    _raises(lambda: f(q, cache.bfloat16(), table, lens, 16), "`kv_cache`", "dtype of `q`")
    _raises(lambda: f(q, cache[0], table, lens, 16), "`kv_cache`", "3-D")
    _raises(lambda: f(q, cache[..., :16], table, lens, 16), "`kv_cache`", "D of `q`")
    _raises(lambda: f(q, cache[:, :0], table, lens, 16), "`kv_cache`", "block_size >= 1")
    _raises(lambda: f(q, cache, table.long(), lens, 16), "`block_table`", "int32")
    _raises(lambda: f(q, cache, table[0], lens, 16), "`block_table`", "2-D")
    _raises(lambda: f(q, cache, table[:1], lens, 16), "`block_table`", "[B, max_blocks]")
    _raises(lambda: f(q, cache, table, lens.long(), 16), "`cache_seqlens`", "int32")
    _raises(lambda: f(q, cache, table, lens[:1], 16), "`cache_seqlens`", "one length per sequence")
    _raises(lambda: f(q, cache, table, lens, 0), "`dv`", "[1, D = 24]")
    _raises(lambda: f(q, cache, table, lens, 25), "`dv`", "[1, D = 24]")
    _raises(lambda: f(q[:, :0], cache, table, lens, 16), "`q`", "Sq, H, D >= 1")
    _raises(lambda: f(q, cache, table, lens, 16, softmax_scale=float("nan")), "`softmax_scale`", "finite")
    if device == "cpu":  # lengths and block ids stay on the device on CUDA
        _raises(lambda: f(q, cache, table, torch.tensor([5, 9], dtype=torch.int32), 16), "`cache_seqlens`",
                "max_blocks * block_size = 8")
        _raises(lambda: f(q, cache, table, torch.tensor([-1, 2], dtype=torch.int32), 16), "`cache_seqlens`")
        bad = torch.tensor([[0, 6], [2, 3]], dtype=torch.int32)
        _raises(lambda: f(q, cache, bad, lens, 16), "`block_table`", "num_blocks = 6", "block_table[0, 1]")
        bad = torch.tensor([[0, 1], [-2, 3]], dtype=torch.int32)
        _raises(lambda: f(q, cache, bad, lens, 16), "`block_table`", "block_table[1, 0]")
        # entries past the cached tokens are never read, so they may hold anything
        ok = torch.tensor([[0, -7], [2, 3]], dtype=torch.int32)
        f(q, cache, ok, torch.tensor([4, 8], dtype=torch.int32), 16)
    else:
        _raises(lambda: f(q, cache.cpu(), table, lens, 16), "`kv_cache`", "one device")
        _raises(lambda: f(q, cache, table.cpu(), lens, 16), "`block_table`", "one device")
