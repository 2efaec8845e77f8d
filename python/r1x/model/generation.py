"""Batched generation over the paged latent KV cache, with MTP speculative decoding.

Two levels:

:class:`CachedLM` runs a :class:`~r1x.model.DeepSeekForCausalLM` over a
:class:`~r1x.nn.PagedLatentCache`: :meth:`CachedLM.prefill` packs new prompts into one
variable-length forward (each layer's :meth:`MLA.forward` writes the prompt's latents into its
cache layer; MoE / MLP on the packed tokens), :meth:`CachedLM.decode` advances B cached
sequences by Sq tokens each (each layer's absorbed :meth:`MLA.decode`; MoE / MLP on the
``[B * Sq, H]`` tokens) and returns their logits. The MTP modules have cache layers of their
own (``num_hidden_layers + k``), filled by :meth:`CachedLM.mtp_prefill` / :meth:`CachedLM.mtp_decode`.

:class:`Generator` schedules requests over it (continuous batching): each step it admits
waiting requests while at most ``max_batch`` run and their worst-case cache need fits
``max_tokens`` (prompt + ``max_new_tokens`` + the draft length, in whole blocks, so a running
sequence can never run out of blocks), prefills them together, then decodes every running
sequence one token (or one speculative step) together; finished sequences free their blocks
and the next requests join.

Sampling: ``temperature == 0`` is greedy (argmax; ties to the lowest id); otherwise logits /
temperature, then top-k (``top_k > 0``), then top-p (nucleus: the smallest set of most likely
tokens whose probability reaches ``top_p``), drawn with a ``torch.Generator`` seeded by
``seed`` (same arguments + same seed -> same outputs; the draws depend on the batch
composition, so ``max_batch`` changes sampled outputs, never greedy ones).

Stopping: a sequence ends after ``max_new_tokens`` tokens, at a stop token (``stop_token_ids``,
default the config's ``eos_token_id``; the stop token is included in the output, as
transformers does), or, with a ``tokenizer`` and ``stop_strings``, at the first token after
which the decoded new tokens contain one of the strings: the output then holds the tokens up to
and including that token (the text may run past the stop string within that token; nothing
is cut inside a token).

Speculative decoding (greedy only: ``temperature > 0`` with ``speculative=True`` raises
ValueError): with k MTP modules, each step the main model verifies ``[last token, d_1..d_k]``
in one ``Sq = k + 1`` decode (causal within the step), accepts the longest prefix of drafts
equal to its own argmax plus its next token (1..k+1 tokens per step), and rolls every cache
layer back to the accepted length with :meth:`PagedLatentCache.truncate`. The drafts for the
next step come from the MTP modules at the last accepted position (the DeepSeek-V3 recurrence
of :class:`~r1x.model.DeepSeekMTPModule`: depth i takes depth i-1's hidden state and the
embedding of token ``t + i``), depth 1 fed with the main model's verified hidden states.
The output is the plain greedy output (drafts only decide how many tokens a step commits).
For depth >= 2 the cache rows of the last i - 1 accepted positions were computed from drafted
tokens (not yet known then) and are kept: this can lower the acceptance rate, never change
the output. :attr:`Generator.stats` counts drafted and accepted tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from r1x.nn.cache import PagedLatentCache
from r1x.nn.moe import MoE

__all__ = ["CachedLM", "Generator", "GenerationStats", "generate", "sample"]


def _bad(name: str, what: str, got) -> ValueError:
    return ValueError(f"generate: `{name}` must be {what}, got {got!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# the model over the cache
# ----------------------------------------------------------------------------------------------
def _mlp(layer, h: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
    """The layer's MoE / dense MLP on ``h [..., H]`` (flattened to tokens)."""
    h2 = h.reshape(-1, h.shape[-1])
    y = layer.mlp(h2, cu) if isinstance(layer.mlp, MoE) else layer.mlp(h2)
    return y.view(h.shape)


def _prefill_layer(layer, x, pos, cu, cache, seq_ids):
    x = x + layer.self_attn(layer.input_layernorm(x), pos, cu, cache=cache, seq_ids=seq_ids)
    return x + _mlp(layer, layer.post_attention_layernorm(x), cu)


def _decode_layer(layer, x, cache, seq_ids):
    x = x + layer.self_attn.decode(layer.input_layernorm(x), cache, seq_ids)
    return x + _mlp(layer, layer.post_attention_layernorm(x), None)


class CachedLM:
    """A :class:`DeepSeekForCausalLM` over a :class:`PagedLatentCache` (inference, no grad).

    Args:
        model: the model (its mode is left alone: call ``model.eval()`` so the MoE routers'
            balancing bias is not updated).
        num_blocks, block_size: of the cache.
        mtp: also give the MTP modules cache layers (speculative decoding).

    The cache has ``num_hidden_layers`` layers (+ one per MTP module with ``mtp``), the MLA
    layers' dtype and the model's device. Sequence ids are the caller's.
    """

    def __init__(self, model, num_blocks: int, block_size: int = 16, mtp: bool = False):
        self.model = model
        self.config = model.config
        self.layers = list(model.model.layers)
        self.mtp = list(model.mtp) if mtp else []
        attn = self.layers[0].self_attn
        self.cache = PagedLatentCache(num_blocks, block_size, attn.latent_dim, len(self.layers) + len(self.mtp),
                                      dtype=attn.dtype, device=model.device)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def _packed(self, prompts: list[list[int]]):
        lens = [len(p) for p in prompts]
        cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
        pos = torch.cat([torch.arange(n) for n in lens])
        return cu.to(self.device), pos.to(self.device)

    @torch.no_grad()
    def prefill(self, seq_ids: list[int], prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the sequences to the cache and run their prompts (one packed forward).

        Returns ``(logits [B, vocab]`` of each prompt's last token, the final normed hidden
        states ``[T, hidden]`` of all prompt tokens, packed)."""
        for s in seq_ids:
            self.cache.add(s)
        cu, pos = self._packed(prompts)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=self.device)
        x = self.model.model.embed_tokens(ids)
        for layer in self.layers:
            x = _prefill_layer(layer, x, pos, cu, self.cache, seq_ids)
        h = self.model.model.norm(x)
        return self.model.lm_head(h[cu[1:].long() - 1]), h

    @torch.no_grad()
    def decode(self, seq_ids: list[int], tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tokens [B, Sq]`` to the cached sequences; ``(logits [B, Sq, vocab],
        final normed hidden [B, Sq, hidden])``."""
        x = self.model.model.embed_tokens(tokens.to(self.device))
        for layer in self.layers:
            x = _decode_layer(layer, x, self.cache, seq_ids)
        h = self.model.model.norm(x)
        return self.model.lm_head(h), h

    def _mtp_input(self, k: int, prev_hidden, next_ids):
        m = self.mtp[k]
        e = self.model.model.embed_tokens(next_ids.to(self.device))
        return m.eh_proj(torch.cat((m.enorm(e), m.hnorm(prev_hidden)), dim=-1))

    @torch.no_grad()
    def mtp_prefill(self, k: int, seq_ids, prompts_lens: list[int], prev_hidden, next_ids) -> torch.Tensor:
        """MTP module ``k`` (0-based) over packed prompts (its cache layer must be empty for
        them): ``prev_hidden [T, H]`` (h^k), ``next_ids [T]`` (token t + k + 1 at row t) -> h^{k+1}."""
        cu, pos = self._packed([[0] * n for n in prompts_lens])
        return _prefill_layer(self.mtp[k], self._mtp_input(k, prev_hidden, next_ids), pos, cu, self.cache, seq_ids)

    @torch.no_grad()
    def mtp_decode(self, k: int, seq_ids, prev_hidden, next_ids) -> torch.Tensor:
        """MTP module ``k`` appending ``[B, Sq]`` rows to its cache layer -> h^{k+1} ``[B, Sq, H]``."""
        return _decode_layer(self.mtp[k], self._mtp_input(k, prev_hidden, next_ids), self.cache, seq_ids)

    def mtp_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.mtp[k].shared_head.norm(h))


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[B]`` (int64) from ``logits [B, vocab]``: greedy for ``temperature == 0``,
    else temperature, top-k, top-p, then a multinomial draw with ``generator``."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# the scheduler
# ----------------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    """Counters of one :meth:`Generator.generate` call.

    Attributes:
        prefill_tokens: prompt tokens prefilled; prefills: prefill batches.
        decode_steps: batched decode (or speculative verify) steps.
        drafted, accepted: speculative decoding's drafted tokens and the accepted ones.
        max_running: the most sequences decoded together.
    """

    prefill_tokens: int = 0
    prefills: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    max_running: int = 0

    @property
    def acceptance_rate(self) -> float:
        """``accepted / drafted`` in [0, 1] (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class _Request:
    index: int
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)
    blocks: int = 0


class Generator:
    """Continuous-batching generation for a :class:`DeepSeekForCausalLM`.

    Args:
        model: the model (put in eval mode for the call, then restored).
        max_batch: the most sequences decoded together.
        max_tokens: the most cache tokens (per layer) the running sequences may claim together
            (each claims prompt + ``max_new_tokens`` + the draft length, rounded up to blocks);
            sizes the cache. Default: what the ``max_batch`` largest requests claim.
        block_size: tokens per cache block.
        seed: seeds the sampling ``torch.Generator`` (None: torch's global RNG).

    Attributes:
        stats: the last :meth:`generate` call's :class:`GenerationStats`.
        engine: the last call's :class:`CachedLM` (its cache is empty after the call).
    """

    def __init__(self, model, max_batch: int = 64, max_tokens: int | None = None, block_size: int = 16,
                 seed: int | None = None):
        for name, v in (("max_batch", max_batch), ("block_size", block_size)):
            if not _is_int(v) or v < 1:
                raise _bad(name, "a positive integer", v)
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise _bad("max_tokens", "None or a positive integer", max_tokens)
        if seed is not None and not _is_int(seed):
            raise _bad("seed", "None or an integer", seed)
        self.model = model
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.block_size = block_size
        self.seed = seed
        self.stats = GenerationStats()
        self.engine: CachedLM | None = None

    # ------------------------------------------------------------------------------------------
    def _validate(self, prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, speculative,
                  tokenizer, stop_strings):
        cfg = self.model.config
        vocab = cfg.vocab_size
        if not isinstance(prompts, (list, tuple)):
            raise _bad("prompts", "a list of token-id lists", type(prompts).__name__)
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if not isinstance(p, (list, tuple)):
                raise ValueError(f"generate: `prompts[{i}]` must be a list of token ids, got {type(p).__name__}")
            if not p:
                raise ValueError(f"generate: `prompts[{i}]` is empty (a prompt needs at least one token)")
            if any(not _is_int(t) or not 0 <= t < vocab for t in p):
                bad = next(t for t in p if not _is_int(t) or not 0 <= t < vocab)
                raise ValueError(f"generate: `prompts[{i}]` holds {bad!r}, not a token id in [0, vocab_size = {vocab})")
            out.append(list(p))
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise _bad("max_new_tokens", "an integer >= 0", max_new_tokens)
        if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature)
                or temperature < 0):
            raise _bad("temperature", "a finite number >= 0", temperature)
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise _bad("top_p", "a number in (0, 1]", top_p)
        if not _is_int(top_k) or top_k < 0:
            raise _bad("top_k", "an integer >= 0 (0: no top-k)", top_k)
        if stop_token_ids is None:
            eos = cfg.eos_token_id
            stop = set() if eos is None else set(eos if isinstance(eos, (list, tuple)) else [eos])
        else:
            ids = [stop_token_ids] if _is_int(stop_token_ids) else stop_token_ids
            if not isinstance(ids, (list, tuple, set)) or any(not _is_int(t) or not 0 <= t < vocab for t in ids):
                raise _bad("stop_token_ids", f"None, a token id or a list of token ids in [0, {vocab})", stop_token_ids)
            stop = set(ids)
        if stop_strings is not None:
            if isinstance(stop_strings, str):
                stop_strings = [stop_strings]
            if not isinstance(stop_strings, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop_strings):
                raise _bad("stop_strings", "None, a non-empty string or a list of them", stop_strings)
            if tokenizer is None:
                raise ValueError("generate: `stop_strings` need a `tokenizer` (to decode the new tokens)")
            stop_strings = list(stop_strings)
        if speculative:
            if temperature > 0:
                raise ValueError("generate: `speculative` decoding is greedy only (temperature = 0); got "
                                 f"`temperature` = {temperature}")
            if not len(self.model.mtp):
                raise ValueError("generate: `speculative` decoding needs the model's MTP modules "
                                 "(num_nextn_predict_layers > 0, built with mtp=True)")
        return out, stop, stop_strings

    # ------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids=None, speculative: bool = False, tokenizer=None,
                 stop_strings=None) -> list[list[int]]:
        """The new tokens of each prompt (see the module docstring for the semantics)."""
        prompts, stop, stop_strings = self._validate(prompts, max_new_tokens, temperature, top_p, top_k,
                                                     stop_token_ids, speculative, tokenizer, stop_strings)
        self.stats = GenerationStats()
        if not prompts or max_new_tokens == 0:
            return [[] for _ in prompts]
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._run(prompts, max_new_tokens, float(temperature), float(top_p), top_k, stop,
                                 stop_strings, tokenizer, bool(speculative))
        finally:
            model.train(was_training)

    def _run(self, prompts, max_new, temperature, top_p, top_k, stop, stop_strings, tokenizer, speculative):
        bs = self.block_size
        k = len(self.model.mtp) if speculative else 0
        reqs = [_Request(i, p) for i, p in enumerate(prompts)]
        for r in reqs:
            r.blocks = -(-(len(r.prompt) + max_new + k) // bs)
        if self.max_tokens is None:
            num_blocks = sum(sorted((r.blocks for r in reqs), reverse=True)[:self.max_batch])
        else:
            num_blocks = -(-self.max_tokens // bs)
            worst = max(reqs, key=lambda r: len(r.prompt))
            if len(worst.prompt) + max_new + k > self.max_tokens:
                raise ValueError(f"generate: `max_tokens` = {self.max_tokens} is too small for prompt "
                                 f"{worst.index} ({len(worst.prompt)} tokens + max_new_tokens = {max_new} + {k} "
                                 f"draft tokens)")
        eng = self.engine = CachedLM(self.model, num_blocks, bs, mtp=speculative)
        dev = eng.device
        rng = None
        if self.seed is not None and temperature > 0:
            rng = torch.Generator(device=dev)
            rng.manual_seed(self.seed)
        stats = self.stats

        def pick(logits):
            return sample(logits, temperature, top_p, top_k, rng).tolist()

        def push(r: _Request, tokens) -> bool:
            """Append tokens to r's output; True when r is finished."""
            for t in tokens:
                r.out.append(int(t))
                if t in stop or len(r.out) >= max_new:
                    return True
                if stop_strings:
                    text = tokenizer.decode(r.out)
                    if any(s in text for s in stop_strings):
                        return True
            return False

        waiting = deque(reqs)
        running: list[_Request] = []
        used = 0
        while waiting or running:
            # admit and prefill
            new = []
            while (waiting and len(running) + len(new) < self.max_batch
                   and used + waiting[0].blocks <= num_blocks):
                r = waiting.popleft()
                used += r.blocks
                new.append(r)
            if new:
                ids = [r.index for r in new]
                logits, h0 = eng.prefill(ids, [r.prompt for r in new])
                stats.prefills += 1
                stats.prefill_tokens += sum(len(r.prompt) for r in new)
                firsts = pick(logits)
                done = [push(r, [t]) for r, t in zip(new, firsts)]
                if speculative:
                    self._draft_prefill(eng, new, firsts, h0)
                for r, d in zip(new, done):
                    if d:
                        eng.cache.free(r.index)
                        used -= r.blocks
                    else:
                        running.append(r)
            if not running:
                continue
            stats.max_running = max(stats.max_running, len(running))
            stats.decode_steps += 1
            ids = [r.index for r in running]
            if speculative:
                finished = self._spec_step(eng, running, push)
            else:
                toks = torch.tensor([[r.out[-1]] for r in running], dtype=torch.int64, device=dev)
                logits, _ = eng.decode(ids, toks)
                finished = {r.index for r, t in zip(running, pick(logits[:, 0])) if push(r, [t])}
            for r in running:
                if r.index in finished:
                    eng.cache.free(r.index)
                    used -= r.blocks
            running = [r for r in running if r.index not in finished]
        return [r.out for r in reqs]

    # ------------------------------------------------------------------------------------------
    # speculative decoding
    def _draft_prefill(self, eng: CachedLM, new: list[_Request], firsts: list[int], h0: torch.Tensor) -> None:
        """Fill the MTP cache layers with the prompts and draft the first step's tokens:
        depth i (1-based) at prompt row t sees h^{i-1}_t and token t + i of
        ``prompt + [first token] + drafts``."""
        lens = [len(r.prompt) for r in new]
        ext = [r.prompt + [f] for r, f in zip(new, firsts)]
        last = torch.tensor(lens, device=eng.device).cumsum(0) - 1
        ids = [r.index for r in new]
        h = h0
        for i in range(len(eng.mtp)):
            nxt = torch.tensor([t for e, n in zip(ext, lens) for t in e[i + 1:i + 1 + n]], dtype=torch.int64,
                               device=eng.device)
            h = eng.mtp_prefill(i, ids, lens, h, nxt)
            d = eng.mtp_logits(i, h[last]).argmax(-1).tolist()
            for e, t in zip(ext, d):
                e.append(t)
        for r, e in zip(new, ext):
            r.drafts = e[len(r.prompt) + 1:]

    def _spec_step(self, eng: CachedLM, running: list[_Request], push) -> set[int]:
        """One verify step for all running sequences; returns the finished ones' indices."""
        k = len(eng.mtp)
        dev = eng.device
        stats = self.stats
        ids = [r.index for r in running]
        starts = [eng.cache.length(s, 0) for s in ids]
        toks = torch.tensor([[r.out[-1]] + r.drafts for r in running], dtype=torch.int64, device=dev)
        logits, h0 = eng.decode(ids, toks)
        g = logits.argmax(-1).tolist()  # [B][k + 1]: the main model's greedy token after each input
        finished, keep, acc = set(), [], []
        for b, r in enumerate(running):
            j = 0
            while j < k and r.drafts[j] == g[b][j]:
                j += 1
            stats.drafted += k
            stats.accepted += j
            acc.append(j)
            if push(r, g[b][:j + 1]):
                finished.add(r.index)
            else:
                keep.append(b)
        if keep:
            # draft the next step: depth i at the verified rows m..m+k (row r sees token
            # m + r + i, from the main model's tokens g, then the drafts of the lower depths)
            sub_ids = [ids[b] for b in keep]
            xs = [g[b][:acc[b] + 1] for b in keep]
            h = h0[keep]
            sel = torch.tensor([acc[b] for b in keep], device=dev)
            rows = torch.arange(len(keep), device=dev)
            for i in range(k):
                nxt = [(x + [0] * (2 * k + 1))[i:i + k + 1] for x in xs]
                h = eng.mtp_decode(i, sub_ids, h, torch.tensor(nxt, dtype=torch.int64, device=dev))
                d = eng.mtp_logits(i, h[rows, sel]).argmax(-1).tolist()
                for x, t in zip(xs, d):
                    x.append(t)
            for n, b in enumerate(keep):
                r = running[b]
                eng.cache.truncate(r.index, starts[b] + acc[b] + 1)
                r.drafts = xs[n][acc[b] + 1:]
        return finished


def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_token_ids=None, speculative: bool = False, *, seed: int | None = None,
             tokenizer=None, stop_strings=None, max_batch: int = 64, max_tokens: int | None = None,
             block_size: int = 16, return_stats: bool = False):
    """:meth:`Generator.generate` with a fresh :class:`Generator`; with ``return_stats``
    returns ``(outputs, GenerationStats)``."""
    gen = Generator(model, max_batch=max_batch, max_tokens=max_tokens, block_size=block_size, seed=seed)
    out = gen.generate(prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, speculative,
                       tokenizer=tokenizer, stop_strings=stop_strings)
    return (out, gen.stats) if return_stats else out
