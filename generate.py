"""Prefill -> evict -> decode, and the command line. Beside it, one concern a file: sampling.py (how
tokens are drawn, speculative acceptance), speculative.py (the drafts: LAQ's reuse, verify mode),
cache_limit.py (eviction during decoding), steps.py (single-token steps, the static fast path).

    python generate.py --ckpt llama --budget 256 --prompt "..."
    python generate.py --method laqpp --budget 128 --prompt-file examples/doc.txt
    python generate.py --method snapkv --budget 128 --cache-limit 512 --max-new-tokens 2048   # bounded memory

Stdout carries only the generated text, streamed; a one-line summary goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import cli

if __name__ == "__main__":
    cli.quiet_ctrl_c()  # before the slow imports below

import torch

import lqc
from cache_limit import EVICT_EVERY, Evictor, check_limit
from checkpoint import load
from cli import BadInput
from sampling import Sampling, accept
from speculative import DRAFT_LEN, CacheDraft, Draft, PseudoDraft, draft_tokens
from steps import FastPath, flex_available, make_step, model_step, plain_step, query_step, sync, to_static

DEMO_PROMPT = """Read the notes and answer the question.

The harbour town of Wrenmouth sits at the mouth of a slow river. Its market opens at dawn on
Tuesdays and Saturdays, and the fishing boats come in before the bells ring at seven. The old
stone bridge was rebuilt twice, once after a winter flood and once after a cart of barrels
cracked its western arch. Children learn to swim in the shallow bay behind the church, where the
water stays warm until late September. The town library keeps a collection of ship logbooks, the
oldest of them written by a captain who sailed to Lisbon and back forty times.

The lighthouse on the northern cliff is kept by a woman named Agnes Morrow. She climbs its
one hundred and twelve steps every evening to light the lamp, and she paints its door a bright
green every spring. Visitors may climb the tower on Sunday afternoons if the wind is calm.

The bakery near the harbour is famous for its rye bread and its honey cakes, which sell out
before noon. In the summer a ferry carries travellers to the island of Carrow, a trip of forty
minutes when the sea is quiet.

Question: Who keeps the lighthouse in Wrenmouth, and what colour is its door?"""


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
        new = step(feed, at, cache)[:, None]
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
    EOS, all stop after max_new_tokens. `on_token` sees row 0. `step(tokens [B, 1], pos [B, 1], cache)
    -> logits [B, V]` may be a compiled decode step.
    Each round feeds the last token with the draft's proposal (none without a draft: plain decoding,
    one token per round), keeps the accepted prefix (`accept`), rewinds the rest, and emits the
    accepted tokens plus the one that follows them. `evictor(cache, n)` (a cache limit, see
    `Evictor`) makes room for the n entries a round feeds."""
    step = step or plain_step(model)
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
        return lambda tokens, pos: fast(tokens, pos, scratch)
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
    full_step = fp or step or model_step(model)  # -> (logits, queries)
    step = (lambda t, p, c: full_step(t, p, c)[0]) if fp or step else plain_step(model)
    evictor = None
    if cache_limit is not None:
        evictor = Evictor(cfg, cache, limit=cache_limit, every=evict_every, step=full_step, obs=pre.obs,
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


# ----------------------------------------------------------------------------------------------
# Command line

class Streamer:
    """Prints the text of new tokens as they come (decoding the whole reply keeps multi-byte
    characters and leading spaces right)."""

    def __init__(self, tokenizer):
        self.tok, self.printed = tokenizer, ""

    def __call__(self, ids):
        text = self.tok.decode(ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
            return
        cli.write_stdout(text[len(self.printed):])
        self.printed = text


class Progress:
    """One status line on stderr, rewritten in place, only when stderr is a terminal: a long
    prefill or compiling the decode step is otherwise minutes of silence."""

    def __init__(self, enabled: bool):
        self.enabled, self.shown = enabled, False

    def show(self, text: str):
        if self.enabled:
            sys.stderr.write(f"\r{text}\033[K")
            sys.stderr.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


@contextmanager
def prefill_progress(model, n_tokens: int, progress: Progress, then: str):
    """Shows "prefill 512/8000 tokens, layer 12/30" from forward hooks (the model is not changed);
    the hooks go once the prompt's last layer has run, before the lookahead or a compiled step
    could see them, and `then` stays on the line."""
    fed, n_layers = [0], len(model.layers)

    def on_pass(module, args):  # args[0]: this pass's tokens [B, T]
        fed[0] += args[0].shape[1]

    def on_layer(i, module, args, output):
        progress.show(f"prefill {fed[0]}/{n_tokens} tokens, layer {i + 1}/{n_layers}")
        if i + 1 == n_layers and fed[0] >= n_tokens:
            remove()
            progress.show(then)

    handles = []
    if progress.enabled:
        handles = [model.register_forward_pre_hook(on_pass)]
        handles += [layer.register_forward_hook(partial(on_layer, i)) for i, layer in enumerate(model.layers)]

    def remove():
        for h in handles:
            h.remove()
    try:
        yield
    finally:
        remove()


class StreamAfterProgress:
    """The CLI's on_token: the answer prefix and the text go to stdout once the status line is
    cleared (both share the terminal). With --compile the first token waits one step more: other
    methods than LAQ compile the step right after it."""

    def __init__(self, streamer: Streamer, progress: Progress, prefix: str, compiling: bool):
        self.streamer, self.progress, self.prefix, self.hold = streamer, progress, prefix, compiling
        self.started = False

    def __call__(self, ids):
        if self.hold:
            self.hold = False
            self.progress.show("compiling the decode step (once per cache size; a minute or more on a CPU)")
            return
        self.start()
        self.streamer(ids)

    def start(self):
        if not self.started:
            self.progress.clear()
            cli.write_stdout(self.prefix)
            self.started = True

    def finish(self, ids):
        """After decoding: whatever is still held back."""
        self.start()
        self.streamer(ids)


WINDOW_RULE = ("A window is part of the budget: --window or --window-laqpp above --budget is clamped to the budget "
               "(a note on stderr says so), and a --budget at least the prompt's length evicts nothing (a note too).")


def parse_args(argv=None):
    p = cli.ArgParser(description="Generate text with a Llama-family model and KV-cache eviction after prefill. "
                                  + WINDOW_RULE + " Bad input ends with one line on stderr and exit code 2.")
    p.add_argument("--ckpt", default="smollm2", help="short name (smollm2, llama, ...), .gguf file, HF directory or hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt (default: stdin when it is not a terminal, else the demo prompt)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    src.add_argument("--demo", action="store_true", help="use the built-in demo prompt (a short document and a question)")
    p.add_argument("--answer-prefix", default="", help="text the reply starts with (appended after the chat header)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="> 0; prompt + this must fit the model's context")
    p.add_argument("--temperature", type=float, default=0.0, help=f"0 = greedy, else a finite number >= {cli.MIN_TEMPERATURE:g}")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="between -2**63 and 2**64-1")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the checkpoint's chat format (default: when it has one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations; bfloat16 on a GPU")
    p.add_argument("--method", default="laqpp", choices=lqc.method_names(), help="the eviction policy (full: none)")
    p.add_argument("--budget", type=int, default=256, help="kept prompt entries per KV head per layer (> 0)")
    p.add_argument("--window", type=int, default=32,
                   help="observation window (SnapKV, PyramidKV, Ada-KV, LAQ's SnapKV copy) / recent window (H2O); "
                        ">= 1, clamped to --budget")
    p.add_argument("--window-laqpp", type=int, default=8, help="prompt-suffix queries of LAQ++; >= 1, clamped to --budget")
    p.add_argument("--lookahead", type=int, default=8,
                   help="pseudo tokens of LAQ / LAQ++ (>= 1); prompt + this must fit the model's context")
    p.add_argument("--pool", default="max", choices=["max", "avg"], help="1-D pooling of the scores along positions")
    p.add_argument("--pool-kernel", type=int, default=7, help=f"odd, 1 to {lqc.MAX_POOL_KERNEL}; 1 = no pooling")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill forward, > 0 (default: the whole prompt in one causal pass; 512 for padded "
                        "batches and H2O)")
    p.add_argument("--fast", action="store_true", help="decode over a static (fixed-capacity) compacted cache")
    p.add_argument("--compile", action="store_true",
                   help="--fast plus torch.compile of the decode step over FlexAttention, and of prefill's element-wise "
                        "work (RMSNorm, RoPE, SwiGLU; one dynamic graph for every length); compiling is shown apart as "
                        "'compile' in the summary. Pays on a GPU at once; on a CPU (~1.2x faster steps) after ~1,000 "
                        "tokens when inductor's cache is warm, ~8,000 when cold (~2 min)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="LAQ / LAQ++: check the lookahead's pseudo tokens as a draft and keep the accepted ones")
    p.add_argument("--verify", default="none", choices=["none", "full"],
                   help="full: lossless; the compacted cache drafts, the full cache (kept too) verifies")
    p.add_argument("--draft-len", type=int, default=DRAFT_LEN, help="draft tokens per round in --verify full")
    p.add_argument("--cache-limit", type=int, default=None,
                   help="bounded memory: at most this many KV entries per head per layer while decoding (evicts during "
                        "decoding; the prompt's eviction keeps at most this many)")
    p.add_argument("--kv-bits", type=int, default=None, choices=[8],
                   help="8: the decode cache holds int8 K/V (a float32 scale per entry; keys per channel, then per "
                        "token), about 3.8x less memory than float32 at head_dim 64; implies --fast. Default: the "
                        "--dtype")
    p.add_argument("--evict-every", type=int, default=EVICT_EVERY,
                   help="with --cache-limit: entries freed per decode-time eviction (the scoring cost is paid once per "
                        "that many tokens)")
    return p.parse_args(argv)


def read_prompt(prompt, prompt_file, demo) -> str:
    if demo:
        return DEMO_PROMPT
    if prompt is not None:
        return cli.check_utf8(prompt, "--prompt")
    if prompt_file is not None:
        return cli.read_file_text(prompt_file, "--prompt-file")
    if sys.stdin is not None and sys.stdin.isatty():
        return DEMO_PROMPT
    return cli.read_stdin_text()


def check_device(device: str, dtype: str):
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BadInput(f"device {device!r} cannot run lqc: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} is not available here (no CUDA): use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"device {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput("device 'mps' is not available here: use --device cpu")
    return dev, getattr(torch, dtype)


def check_context(prompt_tokens: int, max_new_tokens: int, cfg: lqc.EvictConfig, limit: int):
    """After tokenizing, before prefill: every position the run will use must exist."""
    if prompt_tokens + max_new_tokens > limit:
        raise BadInput(f"prompt ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
                       f"context of {limit}: shorten the prompt or lower --max-new-tokens")
    # the pseudo tokens take the positions the answer will take, after the prompt
    if cfg.looks_ahead and prompt_tokens > cfg.budget and prompt_tokens + cfg.lookahead > limit:
        raise BadInput(f"prompt ({prompt_tokens} tokens) + --lookahead ({cfg.lookahead}) exceeds the model's context "
                       f"of {limit}: lower --lookahead")


def main(ckpt, prompt, prompt_file, demo, answer_prefix, max_new_tokens, temperature, top_k, top_p, seed, chat, device,
         dtype, method, budget, window, window_laqpp, lookahead, pool, pool_kernel, prefill_chunk, fast=False,
         compile=False, reuse=True, verify="none", draft_len=DRAFT_LEN, cache_limit=None, evict_every=EVICT_EVERY,
         kv_bits=None):
    cli.positive("--max-new-tokens", max_new_tokens)
    cli.positive("--prefill-chunk", prefill_chunk)
    cli.positive("--draft-len", draft_len)
    cli.check_sampling(temperature, top_k, top_p, seed)
    notes = []
    cli.positive("--evict-every", evict_every)  # checked with or without --cache-limit, as --draft-len without --verify
    cli.positive("--cache-limit", cache_limit)
    cfg = cli.evict_config(method=method, budget=budget, window=window, window_laqpp=window_laqpp, lookahead=lookahead,
                           kernel=pool_kernel, pool=pool, notes=notes, cache_limit=cache_limit)
    verify = None if verify == "none" else verify  # the CLI's word for run_batch's None
    if cache_limit is not None:
        check_limit(cfg, cache_limit, evict_every, verify, draft=draft_tokens(cfg, reuse, verify, draft_len),
                    kv_bits=kv_bits)
    answer_prefix = cli.check_utf8(answer_prefix, "--answer-prefix")
    if sys.stdout is None:  # started with `>&-`: the answer would go nowhere
        raise cli.CannotWrite("cannot write to stdout: it is closed")
    text = read_prompt(prompt, prompt_file, demo).rstrip()  # a file's or echo's final newline is not part of the question
    if not text.strip():
        raise BadInput("the prompt is empty: give --prompt, --prompt-file, text on stdin, or --demo for the built-in one")
    dev, dt = check_device(device, dtype)
    model, tok = load(ckpt, dev, dt)
    if chat and not tok.chat_format:
        raise cli.BadInput(f"--chat: {ckpt} has no chat template lqc knows (ChatML, Llama 2/3, Phi-3): use --no-chat")
    ids = tok.prompt_ids(text, chat=tok.chat_format is not None if chat is None else chat, answer_prefix=answer_prefix)
    check_context(len(ids), max_new_tokens, cfg, model.args.max_seq_len)
    cli.budget_note(method, budget, len(ids), notes, cache_limit=cache_limit, max_new_tokens=max_new_tokens)
    if compile and not flex_available(dev):
        notes.append(f"FlexAttention is not available on {dev.type}; using dense attention")
    for line in notes:  # all input is checked: what lqc does with it
        cli.note("generate.py", line)
    progress = Progress(sys.stderr is not None and sys.stderr.isatty())
    stream = StreamAfterProgress(Streamer(tok), progress, answer_prefix, compiling=compile)
    then = "compiling the decode step" if compile else "evicting" if method != "full" else "decoding"
    with prefill_progress(model, len(ids), progress, then=f"prefill done; {then} ({method})"):
        out, stats = run(model, ids, cfg, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                         eos_ids=tok.eos_ids, sampling=Sampling(temperature, top_k, top_p, seed), on_token=stream,
                         fast=fast, compile=compile, reuse=reuse, verify=verify, draft_len=draft_len,
                         cache_limit=cache_limit, evict_every=evict_every, kv_bits=kv_bits)
    stream.finish(out)
    cli.write_stdout("\n")
    print(f"[{method}] {stats.line()}", file=sys.stderr)


if __name__ == "__main__":
    cli.exit_on_bad_input("generate.py", main, **vars(parse_args()))
