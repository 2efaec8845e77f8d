"""r1x.train.grpo: group advantages and the clipped GRPO loss against plain-loop float64 references."""

import math
import statistics

import pytest
import torch

from r1x.train.grpo import LOSS_TYPES, group_advantages, grpo_loss, process_advantages

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# references: Python floats, one token at a time
# ---------------------------------------------------------------------------------------------


def ref_advantages(rewards, G, scale):
    everything = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        mu, sd = statistics.fmean(group), (statistics.stdev(group) if G > 1 else 0.0)
        for r in group:
            a = r - mu
            out.append(a / (sd + 1e-4) if scale == "group" else a / (everything + 1e-4) if scale == "batch" else a)
    return out


def ref_grpo(logps, old, ref, adv, mask, eps_lo, eps_hi, beta, loss_type, mcl=None, n_items=None):
    lp, od, av, mk = logps.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    rf = ref.tolist() if beta > 0 else None
    B, L = len(lp), len(lp[0])
    per = [[0.0] * L for _ in range(B)]
    n = low = high = region = kl = 0
    for b in range(B):
        for t in range(L):
            if not mk[b][t]:
                continue
            r, a = math.exp(lp[b][t] - od[b][t]), (av[b][t] if isinstance(av[b], list) else av[b])
            v = -min(r * a, min(max(r, 1 - eps_lo), 1 + eps_hi) * a)
            if beta > 0:
                d = rf[b][t] - lp[b][t]
                k = math.exp(d) - d - 1
                v += beta * k
                kl += k
            per[b][t] = v
            n += 1
            lo, hi = r < 1 - eps_lo and a < 0, r > 1 + eps_hi and a > 0
            low, high, region = low + lo, high + hi, region + (lo or hi)
    total = sum(map(sum, per))
    if loss_type == "grpo":
        loss = sum(sum(per[b]) / max(sum(map(bool, mk[b])), 1) for b in range(B)) / B
    elif loss_type == "bnpo" or (loss_type == "dapo" and n_items is None):
        loss = total / max(n, 1)
    elif loss_type == "dapo":
        loss = total / max(n_items, 1)
    else:
        loss = total / (B * (mcl or L))
    stats = {"clip_ratio/low_mean": low / max(n, 1), "clip_ratio/high_mean": high / max(n, 1),
             "clip_ratio/region_mean": region / max(n, 1)}
    if beta > 0:
        stats["kl"] = kl / max(n, 1)
    return loss, stats


def make_inputs(B, L, gen, dtype=F64, spread=0.5, empty_row=True):
    """Log-probs, sampling-time log-probs that differ (so the ratio clips), reference log-probs,
    advantages of both signs and a random completion mask with one all-zero row (B > 1)."""
    logps = -3 * torch.rand(B, L, generator=gen, dtype=F64)
    old = logps + spread * torch.randn(B, L, generator=gen, dtype=F64)
    ref = logps + 0.4 * torch.randn(B, L, generator=gen, dtype=F64)
    adv = torch.randn(B, generator=gen, dtype=F64)
    mask = torch.rand(B, L, generator=gen) < 0.7
    if B > 1 and empty_row:
        mask[int(torch.randint(B, (1,), generator=gen))] = False
    return [x.to(dtype) for x in (logps, old, ref, adv)] + [mask]


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("N,G", [(8, 4), (6, 2), (12, 3), (5, 5), (7, 1), (1, 1)])
def test_group_advantages_match_reference(scale, N, G, gen):
    rewards = torch.randn(N, generator=gen, dtype=F64) * 2 + 0.5
    want = ref_advantages(rewards.tolist(), G, {True: "group", False: "none"}.get(scale, scale))
    got = group_advantages(rewards, G, scale)
    assert got.dtype == F64 and got.shape == (N,)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-12)


def test_group_advantages_by_hand():
    r = [0.0, 1.0, 3.0, 3.0, 1.0, 2.0]
    s = math.sqrt(0.5)  # unbiased std of {0, 1} and of {1, 2}
    torch.testing.assert_close(group_advantages(r, 2), torch.tensor(
        [-0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0.0, 0.0, -0.5 / (s + 1e-4), 0.5 / (s + 1e-4)]))
    everything = statistics.stdev(r)
    torch.testing.assert_close(group_advantages(r, 2, "batch"), torch.tensor(
        [-0.5, 0.5, 0.0, 0.0, -0.5, 0.5]) / (everything + 1e-4))
    torch.testing.assert_close(group_advantages(r, 3, "none"), torch.tensor([-4 / 3, -1 / 3, 5 / 3, 1, -1, 0]))
    torch.testing.assert_close(group_advantages([1.0, 2.0, 3.0, 4.0], 4), torch.tensor(
        [-1.5, -0.5, 0.5, 1.5]) / (statistics.stdev([1, 2, 3, 4]) + 1e-4))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_degenerate_are_zero(scale):
    for rewards, G in (([1.0, -2.0, 5.0], 1), ([3.0], 1), ([2.5] * 6, 3), ([2.5] * 6, 1)):
        got = group_advantages(rewards, G, scale)
        assert not got.isnan().any()
        assert torch.equal(got, torch.zeros(len(rewards)))


def test_group_advantages_dtypes():
    assert group_advantages([1, 0, 0, 1], 2).dtype == torch.float32  # python ints
    assert group_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=F64), 2).dtype == F64
    torch.testing.assert_close(group_advantages(torch.tensor([1, 0, 0, 1]), 2, "none"), torch.tensor([.5, -.5, -.5, .5]))
    assert group_advantages(torch.zeros(0), 4).shape == (0,)


@pytest.mark.parametrize("args,match", [
    (([1.0, 2.0, 3.0], 2), "num_generations"),
    (([1.0, 2.0], 0), "num_generations"),
    (([1.0, 2.0], -2), "num_generations"),
    (([1.0, 2.0], 2.0), "num_generations"),
    (([1.0, 2.0], 2, "mean"), "scale_rewards"),
    (([1.0, 2.0], 2, None), "scale_rewards"),
    (([1.0, 2.0], 2, 1), "scale_rewards"),
    (([1.0, float("nan")], 2), "finite"),
    (([float("inf"), 2.0], 2), "finite"),
    ((torch.ones(2, 2), 2), "rewards"),
])
def test_group_advantages_errors(args, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(*args)


# ---------------------------------------------------------------------------------------------
# grpo_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.28), (0.0, 0.5)])
@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("B,L", [(1, 1), (1, 6), (4, 1), (3, 7), (5, 13)])
def test_grpo_loss_matches_reference(B, L, loss_type, beta, eps, gen):
    logps, old, ref, adv, mask = make_inputs(B, L, gen)
    logps.requires_grad_()
    loss, stats = grpo_loss(logps, old, ref if beta else None, adv, mask, epsilon_low=eps[0],
                            epsilon_high=eps[1], beta=beta, loss_type=loss_type)
    want, want_stats = ref_grpo(logps.detach(), old, ref, adv, mask, *eps, beta, loss_type)
    assert loss.shape == () and loss.dtype == F64
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert stats.keys() == want_stats.keys()  # "kl" only when beta > 0
    for k, v in want_stats.items():
        assert isinstance(stats[k], float) and stats[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k
    loss.backward()
    assert torch.isfinite(logps.grad).all() and not logps.grad[~mask].any()  # padding gets no gradient


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_float32(loss_type, gen):
    logps, old, ref, adv, mask = make_inputs(4, 9, gen, dtype=torch.float32)
    loss, stats = grpo_loss(logps, old, ref, adv, mask, beta=0.1, epsilon_high=0.3, loss_type=loss_type)
    want, _ = ref_grpo(*(x.double() for x in (logps, old, ref, adv)), mask, 0.2, 0.3, 0.1, loss_type)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_grpo_loss_clipping_happens_and_stops_the_gradient(gen):
    B, L = 8, 24
    logps, old, _, adv, mask = make_inputs(B, L, gen, spread=0.6, empty_row=False)
    adv[: B // 2] = adv[: B // 2].abs() + 0.1  # both signs, none zero
    adv[B // 2:] = -adv[B // 2:].abs() - 0.1
    logps.requires_grad_()
    eps_lo, eps_hi = 0.15, 0.25
    loss, stats = grpo_loss(logps, old, None, adv, mask, epsilon_low=eps_lo, epsilon_high=eps_hi, loss_type="bnpo")
    ratio, a = (logps.detach() - old).exp(), adv[:, None]
    low, high = (ratio < 1 - eps_lo) & (a < 0) & mask, (ratio > 1 + eps_hi) & (a > 0) & mask
    assert low.any() and high.any() and stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0
    assert stats["clip_ratio/region_mean"] == pytest.approx((low | high).sum().item() / mask.sum().item())
    loss.backward()
    g = logps.grad
    assert (g[low | high] == 0).all()  # the clipped branch is constant in logps
    free = mask & ~(low | high)
    # d/dlogp of -ratio * A / n = -ratio * A / n on the unclipped tokens
    torch.testing.assert_close(g[free], (-ratio * a / mask.sum())[free], rtol=1e-12, atol=0)
    # the other sides of the clip range (ratio above 1+eps with A < 0, ...) are not clipped
    assert ((ratio > 1 + eps_hi) & (a < 0) & mask).any() or ((ratio < 1 - eps_lo) & (a > 0) & mask).any()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_without_old_logps_keeps_the_ratio_gradient(loss_type, gen):
    B, L = 5, 8
    logps, _, _, adv, mask = make_inputs(B, L, gen)
    logps.requires_grad_()
    loss, stats = grpo_loss(logps, None, None, adv, mask, loss_type=loss_type)
    m, n, a = mask.double(), mask.sum().clamp(min=1), adv[:, None]
    per_seq = mask.sum(1, keepdim=True).clamp(min=1)
    weight = {"grpo": m / per_seq / B, "bnpo": m / n, "dapo": m / n, "dr_grpo": m / (B * L)}[loss_type]
    assert loss.item() == pytest.approx((-a * weight).sum().item(), rel=1e-12, abs=1e-14)  # ratio == 1
    loss.backward()
    torch.testing.assert_close(logps.grad, -a * weight, rtol=1e-12, atol=1e-15)
    assert stats["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_gradcheck(loss_type, gen):
    logps, old, ref, adv, mask = make_inputs(3, 5, gen)
    logps.requires_grad_()
    f = lambda lp: grpo_loss(lp, old, ref, adv, mask, epsilon_low=0.1, epsilon_high=0.3, beta=0.2,  # noqa: E731
                             loss_type=loss_type)[0]
    assert torch.autograd.gradcheck(f, (logps,), eps=1e-6, atol=1e-8)


def test_grpo_loss_gradients_reach_logps_only(gen):
    logps, old, ref, adv, mask = make_inputs(3, 5, gen)
    leaves = [x.clone().requires_grad_() for x in (logps, old, ref, adv)]
    loss, _ = grpo_loss(*leaves, mask, beta=0.1)
    loss.backward()
    assert leaves[0].grad is not None and leaves[0].grad.abs().sum() > 0
    assert all(x.grad is None for x in leaves[1:])


def test_grpo_loss_mask_dtypes_and_padding_values(gen):
    logps, old, ref, adv, mask = make_inputs(4, 7, gen)
    want, _ = grpo_loss(logps, old, ref, adv, mask, beta=0.1)
    for m in (mask.int(), mask.long(), mask.double(), mask.to(torch.uint8)):
        assert grpo_loss(logps, old, ref, adv, m, beta=0.1)[0].item() == want.item()
    # garbage (even non-finite) values where the mask is 0 change neither the loss nor the gradient
    lp = logps.masked_fill(~mask, float("nan")).requires_grad_()
    bad_old, bad_ref = old.masked_fill(~mask, -float("inf")), ref.masked_fill(~mask, 1e4)
    loss, stats = grpo_loss(lp, bad_old, bad_ref, adv, mask, beta=0.1)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert math.isfinite(stats["kl"])
    loss.backward()
    assert torch.isfinite(lp.grad).all() and not lp.grad[~mask].any()


def test_grpo_loss_reference_ignored_without_beta(gen):
    logps, old, ref, adv, mask = make_inputs(3, 6, gen)
    a, sa = grpo_loss(logps, old, None, adv, mask)
    b, _ = grpo_loss(logps, old, torch.full_like(ref, float("nan")), adv, mask)
    assert a.item() == b.item() and "kl" not in sa
    c, sc = grpo_loss(logps, old, ref, adv, mask, beta=0.3)
    assert c.item() != a.item() and sc["kl"] > 0


def test_grpo_loss_denominators(gen):
    B, L = 4, 6
    logps, old, ref, adv, mask = make_inputs(B, L, gen)
    total = ref_grpo(logps, old, ref, adv, mask, 0.2, 0.2, 0.0, "dr_grpo", mcl=1)[0] * B  # masked sum
    assert grpo_loss(logps, old, None, adv, mask, loss_type="dr_grpo", max_completion_length=50)[0].item() \
        == pytest.approx(total / (B * 50), rel=1e-12)
    assert grpo_loss(logps, old, None, adv, mask, loss_type="dapo")[0].item() \
        == pytest.approx(grpo_loss(logps, old, None, adv, mask, loss_type="bnpo")[0].item(), rel=1e-14)
    for n in (37, 37.0, torch.tensor(37), torch.tensor(37.0)):
        assert grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items_in_batch=n)[0].item() \
            == pytest.approx(total / 37, rel=1e-12)
    assert grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", num_items_in_batch=37)[0].item() \
        == pytest.approx(total / mask.sum().item(), rel=1e-12)  # only dapo uses it
    empty = torch.zeros_like(mask)
    for lt in LOSS_TYPES:
        loss, stats = grpo_loss(logps, old, ref, adv, empty, beta=0.1, loss_type=lt, num_items_in_batch=0)
        assert loss.item() == 0.0 and stats == {"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0,
                                                "clip_ratio/region_mean": 0.0, "kl": 0.0}


def _bad(gen):
    logps, old, ref, adv, mask = make_inputs(3, 4, gen)
    return dict(logps=logps, old_logps=old, ref_logps=ref, advantages=adv, mask=mask, beta=0.1)


@pytest.mark.parametrize("change,match", [
    (dict(logps=torch.zeros(3, 4, dtype=torch.long)), "logps"),
    (dict(logps=torch.zeros(12, dtype=F64)), "logps"),
    (dict(logps=torch.zeros(0, 4, dtype=F64)), "logps"),
    (dict(old_logps=torch.zeros(3, 5, dtype=F64)), "old_logps"),
    (dict(old_logps=torch.zeros(3, 4, dtype=torch.int32)), "old_logps"),
    (dict(ref_logps=None), "ref_logps"),
    (dict(ref_logps=torch.zeros(4, 3, dtype=F64)), "ref_logps"),
    (dict(ref_logps=torch.zeros(3, 4, dtype=torch.long)), "ref_logps"),
    (dict(advantages=torch.zeros(3, 1, dtype=F64)), "advantages"),
    (dict(advantages=torch.zeros(3, 4, 1, dtype=F64)), "advantages"),
    (dict(advantages=torch.zeros(3, 5, dtype=F64)), "advantages"),
    (dict(advantages=torch.zeros(4, dtype=F64)), "advantages"),
    (dict(advantages=torch.zeros(3, dtype=torch.long)), "advantages"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool)), "mask"),
    (dict(mask=torch.full((3, 4), 2)), "mask"),
    (dict(mask=torch.full((3, 4), 0.5)), "mask"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(epsilon_high=-1.0), "epsilon_high"),
    (dict(epsilon_high=float("nan")), "epsilon_high"),
    (dict(beta=-0.01), "beta"),
    (dict(loss_type="ppo"), "grpo.*bnpo.*dr_grpo.*dapo"),
    (dict(loss_type="dr_grpo", max_completion_length=0), "max_completion_length"),
    (dict(loss_type="dapo", num_items_in_batch=-1), "num_items_in_batch"),
])
def test_grpo_loss_errors(change, match, gen):
    kw = _bad(gen)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        grpo_loss(kw.pop("logps"), kw.pop("old_logps"), kw.pop("ref_logps"), kw.pop("advantages"), kw.pop("mask"), **kw)


# ---------------------------------------------------------------------------------------------
# per-token advantages: process supervision
# ---------------------------------------------------------------------------------------------


def ref_process(step_rewards, step_ends, G, L, mode):
    out = [[0.0] * L for _ in step_rewards]
    for g in range(0, len(step_rewards), G):
        flat = [r for i in range(g, g + G) for r in step_rewards[i]]
        if not flat:
            continue
        mu, sd = statistics.fmean(flat), (statistics.stdev(flat) if len(flat) > 1 else 0.0)
        for i in range(g, g + G):
            prev = -1
            for e, r in zip(step_ends[i], step_rewards[i]):
                v = (r - mu) / (sd + 1e-4)
                lo = 0 if mode == "return" else (prev + 1 if e > prev else e)
                for t in range(lo, e + 1):
                    out[i][t] += v
                prev = e
    return out


def random_steps(N, L, gen, binary=False):
    rewards, ends = [], []
    for _ in range(N):
        k = int(torch.randint(0, min(L, 5) + 1, (1,), generator=gen))
        e = sorted(torch.randint(0, L, (k,), generator=gen).tolist())
        r = (torch.randint(0, 2, (k,), generator=gen).double() if binary else torch.randn(k, generator=gen, dtype=F64))
        rewards.append(r.tolist())
        ends.append(e)
    return rewards, ends


@pytest.mark.parametrize("mode", ["return", "step"])
@pytest.mark.parametrize("N,G,L", [(8, 4, 9), (6, 2, 1), (5, 5, 13), (3, 1, 4), (12, 3, 7)])
@pytest.mark.parametrize("binary", [False, True])
def test_process_advantages_match_reference(mode, N, G, L, binary, gen):
    rewards, ends = random_steps(N, L, gen, binary)
    got = process_advantages(rewards, ends, G, L, mode)
    assert got.shape == (N, L) and got.dtype == torch.float32
    want = torch.tensor(ref_process(rewards, ends, G, L, mode), dtype=F64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_process_advantages_by_hand():
    # one group of two: steps 1, 0 | 1 -> mean 2/3, std 1/sqrt(3)
    a = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], 2, 5, "return")
    hi, lo = (1 - 2 / 3) / (3 ** -0.5 + 1e-4), (0 - 2 / 3) / (3 ** -0.5 + 1e-4)
    torch.testing.assert_close(a.double(), torch.tensor([[hi + lo, hi + lo, lo, lo, 0], [hi, hi, hi, 0, 0]], dtype=F64),
                               rtol=1e-6, atol=1e-6)
    s = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], 2, 5, "step")
    torch.testing.assert_close(s.double(), torch.tensor([[hi, hi, lo, lo, 0], [hi, hi, hi, 0, 0]], dtype=F64),
                               rtol=1e-6, atol=1e-6)
    # equal step rewards, or no steps at all, carry no signal
    assert not process_advantages([[1.0, 1.0], [1.0], [], []], [[0, 1], [3], [], []], 2, 4).any()


@pytest.mark.parametrize("args,match", [
    (([[1.0]], [[0]], 1, 2, "mc"), "mode"),
    (([[1.0]], [[0]], 0, 2), "num_generations"),
    (([[1.0]], [[0], [1]], 1, 2), "same length"),
    (([[1.0], [0.0], [1.0]], [[0], [0], [0]], 2, 2), "multiple"),
    (([[1.0, 0.0]], [[0]], 1, 2), "step ends"),
    (([[1.0, 0.0]], [[1, 0]], 1, 2), "ascend"),
    (([[1.0]], [[2]], 1, 2), "ascend"),
    (([[float("nan")]], [[0]], 1, 2), "finite"),
])
def test_process_advantages_errors(args, match):
    with pytest.raises(ValueError, match=match):
        process_advantages(*args)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_loss_per_token_advantages_match_reference(loss_type, beta, gen):
    B, L = 5, 11
    logps, old, ref, _, mask = make_inputs(B, L, gen)
    adv = torch.randn(B, L, generator=gen, dtype=F64)
    logps.requires_grad_()
    loss, stats = grpo_loss(logps, old, ref, adv, mask, epsilon_low=0.1, epsilon_high=0.28, beta=beta,
                            loss_type=loss_type)
    want, want_stats = ref_grpo(logps.detach(), old, ref, adv, mask, 0.1, 0.28, beta, loss_type)
    assert stats == pytest.approx(want_stats, rel=1e-10, abs=1e-12)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    loss.backward()
    assert torch.isfinite(logps.grad).all() and not logps.grad[~mask].any()


def test_grpo_loss_sequence_advantages_equal_their_broadcast(gen):
    logps, old, ref, adv, mask = make_inputs(4, 7, gen)
    wide = adv[:, None].expand(4, 7).clone()
    wide[~mask] = float("nan")  # padding values do not matter
    for loss_type in LOSS_TYPES:
        x, y = logps.clone().requires_grad_(), logps.clone().requires_grad_()
        la, sa = grpo_loss(x, old, ref, adv, mask, beta=0.05, loss_type=loss_type)
        lb, sb = grpo_loss(y, old, ref, wide, mask, beta=0.05, loss_type=loss_type)
        la.backward()
        lb.backward()
        assert la.item() == pytest.approx(lb.item(), rel=1e-12) and sa == pytest.approx(sb)
        torch.testing.assert_close(x.grad, y.grad)
