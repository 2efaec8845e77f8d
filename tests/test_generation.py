"""r1x.model.generation: cached (paged latent, absorbed) decode against the full forward,
greedy generation against a naive loop, continuous batching, stopping, sampling, MTP
speculative decoding against plain greedy, argument validation."""

import pytest
import torch

from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
from r1x.model.generation import CachedLM, Generator, generate

PROMPTS = [[5, 9, 33, 200, 17], [7], list(range(10, 28)), [3, 3, 250]]


def randomize(model, gen):
    """Weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2), routers' bias ~ N(0, 0.1^2)."""
    with torch.no_grad():
        for p in model.parameters():
            v = 1 + 0.1 * torch.randn(p.shape, generator=gen) if p.dim() == 1 else \
                torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
            p.copy_(v.to(p.dtype))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


_MODELS = {}


def model_with(n_mtp=1):
    if n_mtp not in _MODELS:
        m = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny", num_nextn_predict_layers=n_mtp))
        randomize(m, torch.Generator().manual_seed(1234 + n_mtp))
        _MODELS[n_mtp] = m.eval()
    return _MODELS[n_mtp]


@pytest.fixture
def model():
    return model_with(1)


def naive_greedy(model, prompt, n):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            out.append(t)
    return out


_REF = {}


def reference(model, n=10):
    key = (id(model), n)
    if key not in _REF:
        _REF[key] = [naive_greedy(model, p, n) for p in PROMPTS]
    return _REF[key]


def close(got, exp):
    atol = 1e-5 * max(exp.abs().max().item(), 1e-3)
    torch.testing.assert_close(got.double(), exp.double(), rtol=1e-4, atol=atol)


# ----------------------------------------------------------------------------------------------
# the cached model
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 16])
def test_cached_decode_logits_equal_full_forward(model, block_size):
    gen = torch.Generator().manual_seed(0)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    lm = CachedLM(model, num_blocks=64 if block_size == 16 else 200, block_size=block_size)
    ids = [10, 11, 12]
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        logits, _ = lm.prefill(ids, prompts)
        for b, s in enumerate(seqs):
            close(logits[b], model(torch.tensor([s])).logits[0, -1])
        for step in range(5):
            sq = 3 if step == 2 else 1  # Sq > 1: the verification shape
            toks = torch.randint(0, 256, (3, sq), generator=gen)
            logits, _ = lm.decode(ids, toks)
            for b, s in enumerate(seqs):
                s.extend(toks[b].tolist())
                close(logits[b], model(torch.tensor([s])).logits[0, -sq:])
        assert [lm.cache.length(i) for i in ids] == [len(s) for s in seqs]
        # roll back and continue: the same logits as a fresh forward over the shorter prefix
        lm.cache.truncate(ids[0], len(seqs[0]) - 2)
        del seqs[0][-2:]
        tok = torch.tensor([[42]])
        logits, _ = lm.decode(ids[:1], tok)
        close(logits[0, 0], model(torch.tensor([seqs[0] + [42]])).logits[0, -1])


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
def test_greedy_equals_naive_loop(model):
    ref = reference(model)
    for bs in (1, 16):
        assert model.generate(PROMPTS, 10, stop_token_ids=[], block_size=bs) == ref


def test_requests_join_midway(model):
    ref = reference(model)
    out, stats = model.generate(PROMPTS, 10, stop_token_ids=[], max_batch=2, return_stats=True)
    assert out == ref and stats.max_running == 2 and stats.prefills >= 2
    # a cache budget for ~one request at a time, and uneven lengths so some finish early
    g = Generator(model, max_batch=3, max_tokens=30, block_size=4)
    assert g.generate(PROMPTS, 10, stop_token_ids=[]) == ref
    assert g.stats.max_running <= 3 and len(g.engine.cache) == 0
    assert g.engine.cache.num_free_blocks == g.engine.cache.num_blocks
    one_by_one = [model.generate([p], 10, stop_token_ids=[])[0] for p in PROMPTS]
    assert one_by_one == ref


def test_stop_tokens_and_max_new_tokens(model):
    ref = reference(model)
    # a stop token in the middle of prompt 0's output: included, and the sequence ends there
    i = next(i for i in range(2, 10) if ref[0][i] not in ref[0][:i])
    stop = ref[0][i]
    out = model.generate(PROMPTS, 10, stop_token_ids=[stop])
    for o, r in zip(out, ref):
        exp = r[:r.index(stop) + 1] if stop in r else r
        assert o == exp
    # default: config.eos_token_id
    saved = model.config.eos_token_id
    try:
        model.config.eos_token_id = stop
        assert model.generate(PROMPTS, 10) == out
    finally:
        model.config.eos_token_id = saved
    assert model.generate(PROMPTS, 0) == [[], [], [], []]
    assert model.generate([], 5) == []
    assert [len(o) for o in model.generate(PROMPTS, 3, stop_token_ids=[])] == [3, 3, 3, 3]


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_strings(model):
    ref = reference(model)
    tok = CharTokenizer()
    target = tok.decode(ref[2][3:5])
    out = model.generate(PROMPTS, 10, stop_token_ids=[], tokenizer=tok, stop_strings=[target])
    for o, r in zip(out, ref):
        cut = next((n for n in range(1, len(r) + 1) if target in tok.decode(r[:n])), len(r))
        assert o == r[:cut]
    assert len(out[2]) <= 5
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(PROMPTS, 3, stop_strings=["x"])


def test_sampling(model):
    ref = reference(model)
    kw = dict(stop_token_ids=[], temperature=1.0, seed=7)
    a = model.generate(PROMPTS, 10, **kw)
    b = model.generate(PROMPTS, 10, **kw)
    assert a == b and a != ref
    assert model.generate(PROMPTS, 10, **kw, top_p=0.9) == model.generate(PROMPTS, 10, **kw, top_p=0.9)
    assert model.generate(PROMPTS, 10, stop_token_ids=[], temperature=2.0, top_k=1, seed=3) == ref
    assert model.generate(PROMPTS, 10, stop_token_ids=[], temperature=2.0, top_p=1e-6, seed=3) == ref
    # top-k restricts the draws to the k most likely tokens
    from r1x.model.generation import sample
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    top3 = logits.topk(3).indices
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = sample(logits, 5.0, 1.0, 3, rng)
        assert (top3 == t[:, None]).any(-1).all()


def test_eval_mode_and_no_bias_update(model):
    model.train()
    bias = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    try:
        model.generate(PROMPTS[:2], 3)
        assert model.training
        for m, b in zip(model.moe_layers(), bias):
            assert torch.equal(m.gate.e_score_correction_bias, b)
    finally:
        model.eval()


# ----------------------------------------------------------------------------------------------
# speculative decoding
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_mtp", [1, 2])
def test_speculative_equals_greedy(n_mtp):
    m = model_with(n_mtp)
    ref = reference(m)
    out, stats = m.generate(PROMPTS, 10, stop_token_ids=[], speculative=True, return_stats=True)
    assert out == ref
    assert 0.0 <= stats.acceptance_rate <= 1.0 and stats.drafted > 0
    out = m.generate(PROMPTS, 10, stop_token_ids=[], speculative=True, max_batch=2, block_size=1)
    assert out == ref


@pytest.mark.parametrize("n_mtp", [1, 2])
def test_speculative_with_oracle_drafts(monkeypatch, n_mtp):
    """Drafts replaced by the true greedy continuation (every other sequence with one wrong
    token): multi-token acceptance, rollback and stopping inside an accepted run."""
    m = model_with(n_mtp)
    ref = reference(m, 12)

    def oracle(reqs):
        for r in reqs:
            d = (ref[r.index] + [0] * 8)[len(r.out):len(r.out) + n_mtp]
            if r.index % 2 and len(r.out) % 3 == 0:
                d[-1] = (d[-1] + 1) % 256
            r.drafts = d

    draft_prefill, spec_step = Generator._draft_prefill, Generator._spec_step

    def patched_prefill(self, eng, new, firsts, h0):
        draft_prefill(self, eng, new, firsts, h0)
        oracle(new)

    def patched_step(self, eng, running, push):
        done = spec_step(self, eng, running, push)
        oracle([r for r in running if r.index not in done])
        return done

    monkeypatch.setattr(Generator, "_draft_prefill", patched_prefill)
    monkeypatch.setattr(Generator, "_spec_step", patched_step)
    out, stats = m.generate(PROMPTS, 12, stop_token_ids=[], speculative=True, return_stats=True, block_size=4)
    assert out == ref
    assert 0.5 < stats.acceptance_rate <= 1.0
    assert stats.decode_steps < 11
    stop = ref[0][5]
    exp = [r[:r.index(stop) + 1] if stop in r else r for r in ref]
    assert m.generate(PROMPTS, 12, stop_token_ids=[stop], speculative=True) == exp
    assert m.generate(PROMPTS, 7, stop_token_ids=[], speculative=True) == [r[:7] for r in ref]


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def test_bad_arguments(model):
    cases = [
        (dict(prompts=[[1, 2], []]), "prompts"),
        (dict(prompts=[[1, 264]]), "prompts"),
        (dict(prompts=[[-1]]), "prompts"),
        (dict(prompts=[[1.0]]), "prompts"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=-0.1), "temperature"),
        (dict(stop_token_ids=[300]), "stop_token_ids"),
        (dict(temperature=1.0, speculative=True), "speculative"),
        (dict(max_batch=0), "max_batch"),
        (dict(block_size=0), "block_size"),
        (dict(max_tokens=4), "max_tokens"),
    ]
    for kw, name in cases:
        args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
        args.update(kw)
        with pytest.raises(ValueError, match=f"`{name}"):
            model.generate(**args)
    no_mtp = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny"), mtp=False)
    with pytest.raises(ValueError, match="speculative"):
        no_mtp.generate([[1]], 2, speculative=True)
    assert generate(model, [], 3) == []
