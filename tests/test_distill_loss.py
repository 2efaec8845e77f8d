"""r1x.train.distill: generalized JSD / forward and reverse KL against plain-loop float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from r1x.train.distill import forward_kl, generalized_jsd_loss, reverse_kl

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# reference: Python floats, one position at a time
# ---------------------------------------------------------------------------------------------


def _softmax(row, T):
    z = [x / T for x in row]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):  # KL(p || q)
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_divergence(s_row, t_row, beta, T):
    """TRL GKD: m = beta * p_T + (1 - beta) * p_S, jsd = beta * KL(p_T||m) + (1 - beta) * KL(p_S||m);
    beta 0 -> KL(p_T||p_S), beta 1 -> KL(p_S||p_T)."""
    ps, pt = _softmax(s_row, T), _softmax(t_row, T)
    if beta == 0:
        return _kl(pt, ps)
    if beta == 1:
        return _kl(ps, pt)
    m = [beta * b + (1 - beta) * a for a, b in zip(ps, pt)]
    return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)


def ref_loss(student, teacher, labels, beta, T, reduction):
    lead, V = student.shape[:-1], student.shape[-1]
    s, t = student.reshape(-1, V).tolist(), teacher.reshape(-1, V).tolist()
    keep = [True] * len(s) if labels is None else [x != -100 for x in labels.reshape(-1).tolist()]
    per = [ref_divergence(a, b, beta, T) if k else 0.0 for a, b, k in zip(s, t, keep)]
    kept = max(sum(keep), 1)
    if reduction == "none":
        return torch.tensor(per, dtype=F64).reshape(lead)
    if reduction == "sum":
        return sum(per)
    if reduction == "mean":  # TRL: jsd.mean() over the kept (position, vocab) elements
        return sum(per) / (kept * V)
    rows = kept if labels is not None else (lead[0] if len(lead) else 1)
    return sum(per) / rows


def make(shape, gen, dtype=F64, scale=2.0, ignore=True):
    s = scale * torch.randn(shape, generator=gen, dtype=F64)
    t = scale * torch.randn(shape, generator=gen, dtype=F64)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    if ignore and labels.numel() > 1:
        labels[torch.rand(shape[:-1], generator=gen) < 0.35] = -100
        labels.view(-1)[0] = -100  # at least one ignored ...
        labels.view(-1)[-1] = 3  # ... and one kept position
    return s.to(dtype), t.to(dtype), labels


SHAPES = [(1, 1, 2), (1, 1, 9), (3, 7, 11), (2, 5, 1), (6, 5), (2, 3, 4, 6), (7,)]


@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_labels", [False, True])
def test_jsd_matches_reference(shape, beta, T, with_labels, gen):
    s, t, labels = make(shape, gen)
    labels = labels if with_labels else None
    for reduction in ("batchmean", "sum", "mean", "none"):
        got = generalized_jsd_loss(s, t, labels, beta=beta, temperature=T, reduction=reduction)
        want = ref_loss(s, t, labels, beta, T, reduction)
        assert got.dtype == F64
        if reduction == "none":
            assert got.shape == shape[:-1]
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        else:
            assert got.shape == () and got.item() == pytest.approx(want, rel=1e-10, abs=1e-12), reduction


def test_jsd_float32_and_bfloat16(gen):
    s, t, labels = make((3, 5, 17), gen)
    want = ref_loss(s, t, labels, 0.3, 1.3, "batchmean")
    got32 = generalized_jsd_loss(s.float(), t.float(), labels, beta=0.3, temperature=1.3)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(want, rel=1e-5)
    sb, tb = s.bfloat16(), t.bfloat16()  # computed in float32: exact up to the rounding of the inputs
    gotb = generalized_jsd_loss(sb, tb, labels, beta=0.3, temperature=1.3)
    assert gotb.dtype == torch.float32
    assert gotb.item() == pytest.approx(ref_loss(sb.double(), tb.double(), labels, 0.3, 1.3, "batchmean"), rel=1e-5)


def test_kl_cases_match_torch_kl_div(gen):
    B, L, V = 3, 6, 10
    s, t, labels = make((B, L, V), gen)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # F.kl_div(input, target) = KL(target || exp(input)); "batchmean" divides by size(0) == B
    fwd = F.kl_div(ls, lt, reduction="batchmean", log_target=True)
    rev = F.kl_div(lt, ls, reduction="batchmean", log_target=True)
    assert forward_kl(s, t).item() == pytest.approx(fwd.item(), rel=1e-12)
    assert reverse_kl(s, t).item() == pytest.approx(rev.item(), rel=1e-12)
    assert generalized_jsd_loss(s, t, beta=0.0).item() == pytest.approx(fwd.item(), rel=1e-12)
    assert generalized_jsd_loss(s, t, beta=1.0).item() == pytest.approx(rev.item(), rel=1e-12)
    keep = labels != -100  # with labels: over the kept rows, divided by their number
    fwd_k = F.kl_div(ls[keep], lt[keep], reduction="batchmean", log_target=True)
    rev_k = F.kl_div(lt[keep], ls[keep], reduction="batchmean", log_target=True)
    assert forward_kl(s, t, labels).item() == pytest.approx(fwd_k.item(), rel=1e-12)
    assert reverse_kl(s, t, labels).item() == pytest.approx(rev_k.item(), rel=1e-12)
    # temperature divides both logits
    T = 1.7
    fwd_t = F.kl_div((s / T).log_softmax(-1), (t / T).log_softmax(-1), reduction="batchmean", log_target=True)
    assert forward_kl(s, t, temperature=T).item() == pytest.approx(fwd_t.item(), rel=1e-12)
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item(), rel=1e-3)


def test_jsd_convention_and_symmetry(gen):
    s, t, labels = make((4, 5, 8), gen)
    for beta in (0.2, 0.5, 0.77):  # beta weights the teacher: swapping the roles is 1 - beta
        a = generalized_jsd_loss(s, t, labels, beta=beta)
        assert a.item() == pytest.approx(generalized_jsd_loss(t, s, labels, beta=1 - beta).item(), rel=1e-12)
    assert generalized_jsd_loss(s, t, beta=0.5).item() == pytest.approx(
        generalized_jsd_loss(t, s, beta=0.5).item(), rel=1e-12)
    # asymmetric for beta != 1/2 (fixed distributions: random logits can land within any tolerance)
    s2 = torch.zeros(1, 1, 2, dtype=torch.float64)
    t2 = torch.tensor([[[0.2, 0.8]]], dtype=torch.float64).log()
    assert generalized_jsd_loss(s2, t2, beta=0.2).item() != pytest.approx(
        generalized_jsd_loss(t2, s2, beta=0.2).item(), rel=1e-2)
    # by hand, V = 2: p_S = (1/2, 1/2), p_T = (1/5, 4/5), beta = 1/4 -> m = (0.425, 0.575)
    ps, pt, beta = (0.5, 0.5), (0.2, 0.8), 0.25
    m = (0.425, 0.575)
    want = beta * sum(p * math.log(p / q) for p, q in zip(pt, m)) + (1 - beta) * sum(
        p * math.log(p / q) for p, q in zip(ps, m))
    got = generalized_jsd_loss(torch.zeros(1, 2, dtype=F64), torch.tensor([[0.0, math.log(4)]], dtype=F64), beta=beta)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_nonnegative_zero_when_equal_and_bounded(beta, gen):
    for _ in range(5):
        s, t, labels = make((3, 4, 7), gen, scale=4.0)
        per = generalized_jsd_loss(s, t, labels, beta=beta, reduction="none")
        assert (per >= 0).all() and (per[labels != -100] > 0).all() and (per[labels == -100] == 0).all()
        if 0 < beta < 1:  # a generalized JSD is at most the entropy of the mixing weights
            assert (per <= -(beta * math.log(beta) + (1 - beta) * math.log1p(-beta)) + 1e-12).all()
        same = generalized_jsd_loss(s, s + 3.0, beta=beta, reduction="none")  # softmax ignores shifts
        assert same.abs().max() < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_gradcheck(beta, gen):
    s, t, labels = make((2, 3, 5), gen, scale=1.0)
    s.requires_grad_()
    t.requires_grad_()
    for lab, red in ((labels, "batchmean"), (None, "mean"), (labels, "none")):
        f = lambda a, b: generalized_jsd_loss(a, b, lab, beta=beta, temperature=0.8, reduction=red)  # noqa: E731
        assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-8)


def test_jsd_ignored_positions(gen):
    s, t, labels = make((2, 6, 9), gen)
    s.requires_grad_()
    loss = generalized_jsd_loss(s, t, labels, beta=0.4)
    loss.backward()
    ignored = labels == -100
    assert ignored.any() and not s.grad[ignored].any() and s.grad[~ignored].abs().sum(-1).gt(0).all()
    # changing ignored logits changes nothing
    s2 = s.detach().clone()
    s2[ignored] = 100 * torch.randn(int(ignored.sum()), 9, generator=gen, dtype=F64)
    assert generalized_jsd_loss(s2, t, labels, beta=0.4).item() == loss.item()
    # nothing kept: 0, not NaN, for every reduction
    none_kept = torch.full_like(labels, -100)
    for red in ("batchmean", "sum", "mean"):
        z = generalized_jsd_loss(s, t, none_kept, reduction=red)
        assert z.item() == 0.0
    s.grad = None
    generalized_jsd_loss(s, t, none_kept).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_jsd_num_items_in_batch(gen):
    s, t, labels = make((3, 4, 6), gen)
    total = generalized_jsd_loss(s, t, labels, beta=0.6, reduction="sum").item()
    for n in (11, 11.0, torch.tensor(11)):
        got = generalized_jsd_loss(s, t, labels, beta=0.6, reduction="mean", num_items_in_batch=n)
        assert got.item() == pytest.approx(total / 11, rel=1e-12)


@pytest.mark.parametrize("change,match", [
    (dict(teacher_logits=torch.zeros(2, 3, 6)), "teacher_logits"),
    (dict(teacher_logits=torch.zeros(2, 4, 5)), "teacher_logits"),
    (dict(student_logits=torch.zeros(2, 3, 5, dtype=torch.long)), "student_logits"),
    (dict(teacher_logits=torch.zeros(2, 3, 5, dtype=torch.int32)), "teacher_logits"),
    (dict(labels=torch.zeros(2, 4, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(2, 3, 5, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(2, 3)), "labels"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=1.5), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(reduction="avg"), "reduction"),
    (dict(num_items_in_batch=0), "num_items_in_batch"),
])
def test_jsd_errors(change, match):
    kw = dict(student_logits=torch.zeros(2, 3, 5), teacher_logits=torch.zeros(2, 3, 5),
              labels=torch.zeros(2, 3, dtype=torch.long))
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        generalized_jsd_loss(**kw)
    if set(change) <= {"student_logits", "teacher_logits", "labels", "temperature"}:
        for fn in (forward_kl, reverse_kl):  # the wrappers validate the same way
            with pytest.raises(ValueError, match=match):
                fn(**kw)
