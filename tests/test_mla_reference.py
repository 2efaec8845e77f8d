"""The MLA references (r1x.reference.mla_attention / mla_decode, DESIGN.md 3.4), which the MLA
kernels' tests will use as their oracle, checked against torch's SDPA."""

import torch
import torch.nn.functional as F

from r1x import reference as ref


def sdpa(q, k, v, scale, mask):
    """q [Sq, H, D], k [L, H, D], v [L, H, Dv], mask [Sq, L] bool, in float64 (math backend)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def test_mla_attention_reference_matches_sdpa(gen):
    h, dqk, dv = 3, 24, 16
    seqlens = [5, 1, 0, 9]
    cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q, k = (torch.randn(t, h, dqk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(t, h, dv, generator=gen, dtype=torch.float64)
    for causal in (True, False):
        out = ref.mla_attention(q, k, v, cu, causal=causal, softmax_scale=0.3)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e == s:
                continue
            mask = torch.ones(e - s, e - s, dtype=torch.bool)
            if causal:
                mask = mask.tril()
            torch.testing.assert_close(out[s:e], sdpa(q[s:e], k[s:e], v[s:e], 0.3, mask))
    # default scale is Dqk ** -0.5
    torch.testing.assert_close(ref.mla_attention(q, k, v, cu), ref.mla_attention(q, k, v, cu, softmax_scale=dqk**-0.5))


def test_mla_decode_reference_matches_contiguous_sdpa(gen):
    b, h, d, dv, bs = 3, 4, 40, 32, 4
    seqlens = torch.tensor([7, 0, 12], dtype=torch.int32)
    max_blocks = 4
    num_blocks = b * max_blocks + 2
    cache = torch.full((num_blocks, bs, d), float("nan"), dtype=torch.float64)  # unused slots: NaN
    perm = torch.randperm(num_blocks, generator=gen)
    table = perm[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    contiguous = [torch.randn(int(n), d, generator=gen, dtype=torch.float64) for n in seqlens]
    for i, rows in enumerate(contiguous):
        for j in range(rows.shape[0]):
            cache[table[i, j // bs], j % bs] = rows[j]
    for sq in (1, 2):
        q = torch.randn(b, sq, h, d, generator=gen, dtype=torch.float64)
        for causal in (True, False):
            out, lse = ref.mla_decode(q, cache, table, seqlens, dv, softmax_scale=0.2, causal=causal)
            assert torch.isfinite(out).all()
            for i, rows in enumerate(contiguous):
                n = rows.shape[0]
                if n == 0:
                    assert (out[i] == 0).all() and (lse[i] == float("-inf")).all()
                    continue
                kk = rows.unsqueeze(1).expand(n, h, d)
                mask = torch.ones(sq, n, dtype=torch.bool)
                if causal:  # bottom-right aligned: query s sits at position n - sq + s
                    mask = torch.arange(n).unsqueeze(0) <= (n - sq + torch.arange(sq)).unsqueeze(1)
                torch.testing.assert_close(out[i], sdpa(q[i], kk, kk[..., :dv], 0.2, mask))
                scores = torch.einsum("qhd,kd->hqk", q[i], rows) * 0.2
                exp_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
                torch.testing.assert_close(lse[i], exp_lse)
