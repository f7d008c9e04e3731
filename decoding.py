"""Prefill -> evict -> decode: the decoding loop every entry point shares (generate.py's command
line, eval.py, bench.py, serve.py, lqc_hf.py's transformers bridge). Beside it, one concern a file:
sampling.py (how tokens are drawn, speculative acceptance), speculative.py (the drafts: LAQ's reuse,
verify mode), cache_limit.py (eviction during decoding), steps.py (the decode step, the static fast
path). The command line is generate.py."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import torch

import lqc
from cache_limit import EVICT_EVERY, Evictor, check_limit
from sampling import Sampling, accept
from speculative import DRAFT_LEN, CacheDraft, Draft, PseudoDraft, draft_tokens
from steps import FastPath, flex_available, make_step, model_step, query_step, sync, to_static


@dataclass
class Prefill:
    cache: object  # model.KVCache: the whole prompt, per KV head
    obs: lqc.Observation  # what eviction reads besides the cache: last logits, queries, H2O's mass


def prefill(model, ids: torch.Tensor, *, chunk: int | None = None, keep_queries: int = 0, h2o: bool = False,
            pad: torch.Tensor | None = None) -> Prefill:
    """Run the prompts `[B, L]` through the model in chunks of `chunk` tokens. By default the whole
    prompt goes in one pass, where attention is causal and needs no mask (the fastest); rows
    left-padded by `pad[b]` tokens (padding gets position -1 and is never seen by real tokens) and
    H2O (which needs every query) go in chunks of 512, so their masks and queries stay chunk x L.
    Keeps the last `keep_queries` queries per layer and, for H2O, the attention mass every key
    receives from all prompt queries."""
    chunks = prefill_chunks(model, ids, chunk=chunk, keep_queries=keep_queries, h2o=h2o, pad=pad)
    while True:
        try:
            next(chunks)
        except StopIteration as done:
            return done.value


@torch.no_grad()  # on a generator: each resumption runs without grad, wherever the caller is
def prefill_chunks(model, ids: torch.Tensor, *, chunk: int | None = None, keep_queries: int = 0, h2o: bool = False,
                   pad: torch.Tensor | None = None):
    """`prefill` one chunk at a time: a generator that yields the tokens fed so far after each chunk
    and returns the `Prefill` (a server decodes its running requests between a new one's chunks)."""
    B, L = ids.shape
    if chunk is None:
        chunk = L if pad is None and not h2o else 512
    cache = model.new_cache()
    pos_all = torch.arange(L, device=ids.device).expand(B, L)  # [B, L]
    if pad is not None:
        pos_all = (pos_all - pad[:, None]).clamp(min=-1)
    obs_q, mass = None, None
    want_q = keep_queries > 0 or h2o
    for s in range(0, L, chunk):
        pos = pos_all[:, s:s + chunk]
        out = model(ids[:, s:s + chunk], pos, cache, return_queries=want_q, last_logits=1,
                    last_queries=None if h2o else keep_queries, prefill=True)
        logits, qs = out if want_q else (out, None)
        if h2o:
            mass = [lqc.accumulate_mass(None if mass is None else mass[l], q, cache.k[l], pos, cache.pos[l])
                    for l, q in enumerate(qs)]
        if keep_queries:  # the window may straddle two chunks
            obs_q = qs if obs_q is None else [torch.cat([a, b], 2) for a, b in zip(obs_q, qs)]
            obs_q = [q[:, :, -keep_queries:] for q in obs_q]
        yield min(s + chunk, L)
    obs_pos = pos_all[:, L - (obs_q[0].shape[2] if obs_q else 0):]
    next_pos = pos_all[:, -1] + 1  # [B]
    return Prefill(cache, lqc.Observation(logits[:, -1], next_pos, obs_q, obs_pos, mass))


def target_logits(model, step, cache, pending, draft, pos, logits):
    """The cache's logits `[B, k+1, V]` at each draft position and one past, from one forward of the
    pending token (at pos - 1) and the draft `[B, k]` (at pos, pos + 1, ...); see `Draft`."""
    feed = draft if pending is None else torch.cat([pending[:, None], draft], 1)  # [B, T]
    at = (pos - int(pending is not None))[:, None] + torch.arange(feed.shape[1], device=pos.device)  # [B, T]
    if feed.shape[1] == 0:
        new = logits[:, :0, None].expand(-1, -1, logits.shape[-1])
    elif feed.shape[1] == 1:  # plain decoding: the single-token step, maybe compiled
        new = step(feed, at, cache)[0][:, None]
    else:
        new = model(feed, at, cache)
    return new if pending is not None else torch.cat([logits[:, None], new], 1)


def append_tokens(out: list, tokens: list, eos_ids, max_new_tokens: int) -> bool:
    """Append a row's new tokens up to EOS or max_new_tokens; whether the row is finished."""
    for t in tokens:
        if t in eos_ids:
            return True
        out.append(t)
        if len(out) >= max_new_tokens:
            return True
    return False


@torch.no_grad()
def decode(model, cache, logits, next_pos, *, max_new_tokens: int, eos_ids=(), sampling: Sampling = Sampling(),
           on_token=None, step=None, draft: Draft | None = None, evictor=None) -> list[list[int]]:
    """Decode from the prefill logits `[B, V]`, the cache growing by one entry per token; a row stops at
    EOS, all stop after max_new_tokens. `on_token` sees row 0. `step` is the decode step (`model_step`
    by default; maybe compiled: see steps.py).
    Each round feeds the last token with the draft's proposal (none without a draft: plain decoding,
    one token per round), keeps the accepted prefix (`accept`), rewinds the rest, and emits the
    accepted tokens plus the one that follows them. `evictor(cache, n)` (a cache limit, see
    `Evictor`) makes room for the n entries a round feeds."""
    step = step or model_step(model)
    gen = sampling.generator(logits.device)
    B = logits.shape[0]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    pos, pending = next_pos, None  # pos [B]: the next token's position; pending [B]: the last token, at pos - 1, not yet fed
    while not done.all():
        left = max_new_tokens - min(len(o) for o, finished in zip(out, done.tolist()) if not finished)
        proposal = draft.propose(pending, logits, pos, left - 1, gen) if draft else None
        tokens, q = proposal or (pos.new_zeros(B, 0), None)  # [B, k]
        if evictor:
            evictor(cache, tokens.shape[1] + (pending is not None))
        n, nxt = accept(target_logits(model, step, cache, pending, tokens, pos, logits), tokens, q, sampling, gen)
        if draft:
            draft.drafted += tokens.shape[1] * int((~done).sum())
            draft.accepted += int(n[~done].sum())
        # a finished row keeps nothing new, not even its pending token, and stays where it is, so the
        # caches never grow on its account
        n = torch.where(done, -1, n)
        if tokens.shape[1] or done.any():
            cache.rewind(pos + n)
            if draft:
                draft.rewind(pos + n)
        streamed = len(out[0])
        for b, (finished, m, drafted, t) in enumerate(zip(done.tolist(), n.tolist(), tokens.tolist(), nxt.tolist())):
            if not finished:
                done[b] = append_tokens(out[b], drafted[:m] + [t], eos_ids, max_new_tokens)
        if on_token and len(out[0]) > streamed:
            on_token(out[0])
        pos, pending = pos + n + 1, nxt
    return out


@dataclass
class Stats:
    prompt_tokens: int = 0
    kept: int = 0
    prefill_s: float = 0.0
    evict_s: float = 0.0  # without compilation
    new_tokens: int = 0
    decode_s: float = 0.0  # without compilation
    compile_s: float = 0.0  # the compiled step's first call (compiles once per cache capacity)
    prefill_compile_s: float = 0.0  # --compile: the fused prefill segments (once per process; inductor caches on disk)
    drafted: int = 0  # speculative modes (reuse, verify): draft tokens proposed and accepted
    accepted: int = 0
    cache_limit: int | None = None
    limit_evict_s: float = 0.0  # decode-time eviction (a cache limit), part of decode_s
    limit_evictions: int = 0

    def line(self) -> str:
        tps = self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")
        compiled = f" | compile {self.compile_s:.1f} s" if self.compile_s else ""
        if self.prefill_compile_s:
            compiled += f" (+ {self.prefill_compile_s:.1f} s for prefill)"
        draft = f" | draft {self.accepted}/{self.drafted} accepted" if self.drafted else ""
        limit = "" if self.cache_limit is None else (
            f" | limit {self.cache_limit}: eviction {100 * self.limit_evict_s / max(self.decode_s, 1e-9):.1f}% of decode")
        return (f"prompt {self.prompt_tokens} tok | KV kept {self.kept}/{self.prompt_tokens} per head per layer | "
                f"prefill {self.prefill_s:.2f} s ({self.prompt_tokens / max(self.prefill_s, 1e-9):.0f} tok/s) | "
                f"evict {self.evict_s:.3f} s | decode {self.new_tokens} tok at {tps:.1f} tok/s{compiled}{draft}{limit}")


def evict(cfg: lqc.EvictConfig, model, pre: Prefill, *, eos_ids=(), fast: FastPath | None = None, on_pseudo=None):
    """The eviction step between prefill and decode: returns the compacted cache and the kept
    indices per layer (None when nothing was evicted). LAQ's lookahead runs on a compacted copy:
    a readable cache, or on the fast path a static one with the fast path's step. `on_pseudo`
    receives the lookahead's pseudo tokens `[B, n + 1]` (see `lqc.plan_eviction`)."""
    def lookahead_step(kept):
        if fast is None:
            return query_step(model, pre.cache.gather(kept))
        scratch = fast.pack(model, pre.cache.gather(kept), extra=max(fast.extra, cfg.lookahead), scratch=True)
        return partial(fast, cache=scratch)
    indices = lqc.plan_eviction(cfg, pre.obs, keys=pre.cache.k, positions=pre.cache.pos, eos_ids=eos_ids,
                                lookahead_step=lookahead_step, on_pseudo=on_pseudo)
    return (pre.cache, None) if indices is None else (pre.cache.gather(indices), indices)


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one `[B, L]` batch, left-padded, and the padding per row `[B]`."""
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    return torch.tensor([[0] * (L - len(p)) + p for p in prompts], device=device), pad


@torch.no_grad()
def run_batch(model, prompts: list[list[int]], cfg: lqc.EvictConfig, *, max_new_tokens=256, prefill_chunk=None,
              eos_ids=(), sampling: Sampling = Sampling(), on_token=None, fast=False, compile=False, step=None,
              reuse=True, verify: str | None = None, draft_len: int = DRAFT_LEN, cache_limit: int | None = None,
              evict_every: int = EVICT_EVERY, kv_bits: int | None = None):
    """Prefill, evict, decode a batch of prompts (left-padded; each row evicted on its own).
    fast: the lookahead and decoding over static compacted caches; compile: with a compiled step
    over FlexAttention. step: a `model_step`-like function to decode with (tests pass a compiled
    one to count its graphs, or one that watches the cache). reuse (LAQ): LAQ's pseudo tokens are
    the first round's draft. verify="full": lossless; the compacted cache drafts draft_len tokens a
    round and the full cache, kept beside it, checks them. cache_limit: no KV head of any layer
    holds more entries while decoding (the prompt's eviction keeps at most that many, then
    `Evictor` frees evict_every at a time). kv_bits=8: the decode cache holds int8 entries (the fast
    path; see StaticKVCache). Returns (new token ids per row, Stats)."""
    device = model.tok_embeddings.weight.device
    x, pad = left_pad(prompts, device)  # [B, L], [B]
    stats = Stats(prompt_tokens=x.shape[1], cache_limit=cache_limit)
    if verify not in (None, "full"):
        raise ValueError(f"verify={verify!r}: None (no verification) or 'full'")
    if kv_bits not in (None, 8):
        raise ValueError(f"kv_bits={kv_bits!r}: None (the model's dtype) or 8")
    k = draft_tokens(cfg, reuse, verify, min(draft_len, max_new_tokens))  # a round never drafts past the answer
    room = max_new_tokens + 2 * k + 1  # a round may feed k tokens past the end (see decode)
    capacity = None
    if cache_limit is not None:
        check_limit(cfg, cache_limit, evict_every, verify, draft=k, kv_bits=kv_bits)
        # capacity = the limit (the evictor makes room before each round), or what the run can ever
        # hold (prompt + answer + a round's draft) when the limit is above that; no layer or head
        # keeps more of the prompt (PyramidKV's and Ada-KV's wider shares are cut to it)
        capacity = min(cache_limit, x.shape[1] + room)
        cfg = replace(cfg, budget=min(cfg.budget, capacity), cap=capacity)
    fp = None
    if fast or compile or kv_bits:
        extra = max(room, cfg.lookahead) if capacity is None else 0
        fp = FastPath(step or make_step(model, compile), extra, flex=compile and flex_available(device), capacity=capacity,
                      kv_bits=kv_bits, compiled=compile)
    if compile and model.fused is None:  # --compile covers prefill too: its element-wise work, fused
        stats.prefill_compile_s = model.fuse_prefill()
    sync(device)  # on CUDA, the stages' times are the GPU's, not the launches'
    t0 = time.perf_counter()
    pre = prefill(model, x, chunk=prefill_chunk, keep_queries=cfg.obs_window, h2o=cfg.needs_mass,
                  pad=pad if pad.any() else None)
    sync(device)
    t1 = time.perf_counter()
    pseudo = []
    cache, indices = evict(cfg, model, pre, eos_ids=eos_ids, fast=fp, on_pseudo=pseudo.append)
    cache = fp.pack(model, cache) if fp else cache
    stats.kept = int(cache.kept()[:, 0].float().mean().round())  # row 0, mean over layers and KV heads
    step = fp or step or model_step(model)
    evictor = None
    if cache_limit is not None:
        evictor = Evictor(cfg, cache, limit=cache_limit, every=evict_every, step=step, obs=pre.obs,
                          prompt_pos=pre.cache.pos)
        step, pre.cache = evictor.step, None  # the whole prompt's cache is not needed any more
    draft = None
    if verify and indices is not None:  # nothing evicted: nothing to check
        draft = CacheDraft(cache=cache, step=step, k=k, sampling=sampling)
        # the target: the full cache, on the draft's attention path (a compiled step compiles once more,
        # for the target's capacity, not for another path)
        cache = to_static(model, pre.cache, fp.extra, flex=fp.flex, kv_bits=kv_bits) if fp else pre.cache
    elif reuse and pseudo:
        draft = PseudoDraft(tokens=pseudo[0])
    sync(device)
    t2 = time.perf_counter()
    evict_compile = fp.compile_s if fp else 0.0  # the lookahead may have compiled the step
    out = decode(model, cache, pre.obs.logits, pre.obs.next_pos, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                 sampling=sampling, on_token=on_token, step=step, draft=draft, evictor=evictor)
    sync(device)
    t3 = time.perf_counter()
    stats.compile_s = fp.compile_s if fp else 0.0
    stats.prefill_s, stats.evict_s = t1 - t0, t2 - t1 - evict_compile
    stats.decode_s, stats.new_tokens = t3 - t2 - (stats.compile_s - evict_compile), len(out[0])
    if draft:
        stats.drafted, stats.accepted = draft.drafted, draft.accepted
    if evictor:
        stats.limit_evict_s, stats.limit_evictions = evictor.seconds, evictor.evictions
    return out, stats


def run(model, ids: list[int], cfg: lqc.EvictConfig, **kw):
    """One prompt: (new token ids, Stats). Keyword arguments as for `run_batch`."""
    out, stats = run_batch(model, [ids], cfg, **kw)
    return out[0], stats
