"""Serving many requests in a fixed KV memory: continuous batching over the slots of one static cache.

    python serve.py --requests reqs.jsonl --out answers.jsonl --kv-memory 256MB --method laqpp --budget 256
    python serve.py --bench --kv-memory 400MB --length 2048 --requests-n 16 --rates 0.5 inf   # the economics table

A request line is `{"id": ..., "prompt": "..."}` (or `"messages": [{"role": "system" | "user",
"content": ...}]`), optionally with its own "method", "budget", "max_new_tokens" and "arrival"
(seconds after the start). Each answer is one line `{"id", "line", "text", ...timings}` of --out,
written (and flushed) as it finishes; a refused request is `{"id", "line", "error"}`. A rerun with
the same --out skips the lines already answered.

How it works: --kv-memory is divided into slots, one row each of one `StaticKVCache`; a slot holds
what a request keeps (its kept prompt entries plus its answer), so eviction turns into more slots.
A request is admitted when a slot is free and it has arrived, prefilled in chunks of
--prefill-chunk tokens (the running requests decode one token between two chunks), evicted on its
own, written into its slot, and decoded with every other active slot in one batched step; a
finished request frees its slot at once. Idle time waiting for the next arrival is skipped (the
clock jumps to it), so the timings are the machine's work only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cli

if __name__ == "__main__":
    cli.quiet_ctrl_c()  # before the slow imports below

import torch

import decoding as D
import lqc
import model as M
import ruler
from cache_limit import EVICT_EVERY, Evictor, check_limit
from checkpoint import load
from cli import BadInput
from sampling import Sampling, sample
from steps import make_step, sync

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'1.5GB', '64MB', '512MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m and (m.group(2).upper() or "B")
    if not m or unit not in UNITS or len(m.group(1)) > 20:  # 20 digits: far more than any machine holds
        raise BadInput(f"--kv-memory {text!r}: give a size such as 64MB, 1.5GB or 512MiB")
    return int(float(m.group(1)) * UNITS[unit])


def slot_cache(model, n_slots: int, capacity: int, kv_bits: int | None = None, device=None) -> M.StaticKVCache:
    """The static cache of `n_slots` rows that a Server decodes over."""
    a, w = model.args, model.tok_embeddings.weight
    return M.StaticKVCache(a.n_layers, n_slots, a.n_kv_heads, capacity, a.head_dim, a.n_heads // a.n_kv_heads,
                           w.dtype, w.device if device is None else device, flex=False, kv_bits=kv_bits)


def slot_bytes(model, capacity: int, kv_bits: int | None = None) -> int:
    """Bytes of one slot: the buffers of a one-row slot cache, built on the meta device (no memory),
    so the count follows StaticKVCache's layout (K, V, positions, lengths; int8 codes and scales)."""
    return sum(b.numel() * b.element_size() for b in slot_cache(model, 1, capacity, kv_bits, "meta").buffers())


# ----------------------------------------------------------------------------------------------
# Requests

@dataclass
class Request:
    id: object
    line: int  # 1-based line of the requests file (or index of a generated request)
    ids: list  # prompt token ids
    cfg: lqc.EvictConfig
    max_new_tokens: int
    arrival: float = 0.0
    expected: tuple = ()  # generated requests: what the answer must contain (ruler.score)

    def within(self, context: int) -> bool:
        """Prompt and answer fit the model's context."""
        return len(self.ids) + self.max_new_tokens <= context

    def holds(self, n_layers: int) -> int:
        """Cache entries per KV head the request needs: its kept prompt plus its answer."""
        entry = self.cfg.entry
        kept = len(self.ids) if entry is None else min(len(self.ids), entry.widest(self.cfg, n_layers))
        return kept + self.max_new_tokens


def _text(value, where: str, what: str) -> str:
    """A non-empty string that encodes as UTF-8 (JSON can escape a lone surrogate, which no tokenizer takes)."""
    if not isinstance(value, str) or not value.strip():
        raise BadInput(f"{where}: {what} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{where}: {what} is not valid Unicode (a lone surrogate escape such as \\ud800)") from None
    return value


def request_text(r: dict, where: str) -> tuple[str, str | None]:
    """(user text, system text or None) of one request object."""
    if "prompt" in r:
        return _text(r["prompt"], where, "'prompt'"), None
    msgs = r.get("messages")
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)):
        raise BadInput(f"{where}: give 'prompt' (a string) or 'messages' (a list of {{role, content}})")
    if [m.get("role") for m in msgs] not in (["user"], ["system", "user"]):
        raise BadInput(f"{where}: 'messages' must be one user message, optionally after one system message "
                       "(lqc serves single-turn requests)")
    system = _text(msgs[0].get("content"), where, "the system content") if len(msgs) == 2 else None
    return _text(msgs[-1].get("content"), where, "the user content"), system


def _count(value, where: str, what: str, low: float, integer: bool) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    try:
        ok = ok and not isinstance(value, bool) and math.isfinite(value) and value >= low
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise BadInput(f"{where}: {what} must be {'an integer' if integer else 'a number'} >= {low:g}")
    return value


def parse_request(line: str, n: int, tok, flags: dict, chat: bool) -> Request:
    """One request line; `flags`: the command line's method, budget, windows and max_new_tokens, the
    defaults of a request's own fields."""
    where = f"line {n}"
    try:
        r = json.loads(line)
    except RecursionError:
        raise BadInput(f"{where} nests too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, or an integer of thousands of digits
        raise BadInput(f"{where} is not JSON: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(r, dict) or "id" not in r:
        raise BadInput(f"{where}: a request is a JSON object with an 'id'")
    text, system = request_text(r, where)
    if system is not None and not (chat and tok.chat_format):
        raise BadInput(f"{where}: a system message needs the checkpoint's chat format (and no --no-chat)")
    method = r.get("method", flags["method"])
    if method not in lqc.method_names():
        raise BadInput(f"{where}: 'method' must be one of {', '.join(lqc.method_names())}")
    budget = _count(r.get("budget", flags["budget"]), where, "'budget'", 1, integer=True)
    max_new = _count(r.get("max_new_tokens", flags["max_new_tokens"]), where, "'max_new_tokens'", 1, integer=True)
    arrival = _count(r.get("arrival", 0.0), where, "'arrival' (seconds)", 0, integer=False)
    # the window rule as on the command line, from the flags as given: a window above the request's
    # budget is clamped to it
    cfg = cli.evict_config(method=method, budget=budget, window=flags["window"], window_laqpp=flags["window_laqpp"],
                           lookahead=flags["lookahead"], cache_limit=flags.get("cache_limit"))
    try:
        ids = tok.prompt_ids(text, chat=chat and tok.chat_format is not None, system=system)
    except cli.CheckpointError as e:  # a token id past the model's embeddings
        raise BadInput(f"{where}: {e}") from None
    return Request(r["id"], n, ids, cfg, max_new, float(arrival))


def read_requests(text: str, tok, flags: dict, chat: bool) -> tuple[list[Request], list[dict]]:
    """The requests of a JSONL text and an error record for each line that is not one. Lines end at
    "\\n" only: JSON allows U+2028 and friends raw inside strings."""
    requests, errors = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            requests.append(parse_request(line, n, tok, flags, chat))
        except BadInput as e:
            rid = None
            try:
                rid = json.loads(line).get("id")
            except Exception:  # the line is not an object: its error says so already
                pass
            errors.append({"id": rid, "line": n, "error": str(e)})
    return requests, errors


def suite_requests(tok, *, n: int, length: int, rate: float, default, seed: int = 0) -> list[Request]:
    """n RULER-style requests (ruler.SUITE, tasks in turn) of about `length` tokens, arriving as a
    Poisson process of `rate` per second (inf: all at once)."""
    tasks = list(ruler.SUITE)
    samples = ruler.build(tok, tasks, [length], [0.1, 0.3, 0.5, 0.7, 0.9], -(-n // len(tasks)))[:n]
    rng, t, out = random.Random(seed), 0.0, []
    for i, s in enumerate(samples):
        ids = tok.prompt_ids(s.context, chat=tok.chat_format is not None, answer_prefix=s.answer_prefix)
        out.append(Request(f"{s.name}-{i}", i + 1, ids, default, s.max_new, t, tuple(s.expected)))
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    return out


# ----------------------------------------------------------------------------------------------
# The server

@dataclass
class Active:
    req: Request
    pos: int  # the next token's position
    token: int  # the last token, not yet fed
    out: list = field(default_factory=list)
    times: list = field(default_factory=list)  # when each token came (clock seconds)
    eos_at: int | None = None  # ignore_eos: where the answer's first EOS came


class Clock:
    """Seconds of work since the start; waiting for an arrival jumps instead of sleeping."""

    def __init__(self):
        self.start, self.skipped = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start + self.skipped

    def wait_until(self, t: float):
        self.skipped += max(0.0, t - self.now())


class Server:
    """Slots of one StaticKVCache `[n_slots, H_kv, capacity, D]` per layer; see the module docstring.
    `static=True`: a new batch is admitted only when every slot is free (padded static batches).
    `limit_cfg`: a cache limit of `capacity` entries (`--cache-limit`): each slot evicts on its own
    once full, by limit_cfg's decode-time rule (`cache_limit.Evictor`), as the request would alone."""

    def __init__(self, model, tok, *, n_slots: int, capacity: int, prefill_chunk: int = 512,
                 sampling: Sampling = Sampling(), compile: bool = False, static: bool = False, ignore_eos: bool = False,
                 kv_bits: int | None = None, limit_cfg: lqc.EvictConfig | None = None, evict_every: int = EVICT_EVERY):
        device = model.tok_embeddings.weight.device
        self.model, self.tok, self.chunk, self.sampling, self.static = model, tok, prefill_chunk, sampling, static
        self.ignore_eos = ignore_eos  # every request decodes max_new_tokens (a throughput benchmark's load)
        self.cache = slot_cache(model, n_slots, capacity, kv_bits)
        self.step = make_step(model, compile)
        self.evictor = None
        if limit_cfg is not None:
            self.evictor = Evictor(limit_cfg, self.cache, limit=capacity, every=evict_every, step=self.step, obs=None)
            self.step = self.evictor.step  # keeps the queries the rule reads
        self.slots: list[Active | None] = [None] * n_slots
        self.gen = sampling.generator(device)
        self.device = device
        self.prefill_s = self.evict_s = self.decode_s = 0.0
        self.peak = 0

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def fits(self, req: Request) -> str | None:
        """Why the request can never be served here, or None."""
        ctx = self.model.args.max_seq_len
        if not req.within(ctx):
            return (f"prompt ({len(req.ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's "
                    f"context of {ctx}")
        if self.evictor is not None:  # a slot evicts while decoding: any request fits, if the rule is the slots'
            rule = self.evictor.cfg
            if (req.cfg.method, req.cfg.window) != (rule.method, rule.window):
                return (f"method {req.cfg.method!r} with observation window {req.cfg.window}: with --cache-limit every "
                        f"slot evicts while decoding by one rule, --method {rule.method} with window {rule.window} "
                        "(--window, narrowed by a budget below it); give the request the flags' method, and a budget "
                        "that clamps the window as --budget does, or serve it in another run")
            return None
        need = req.holds(self.model.args.n_layers)
        if need > self.capacity:
            return (f"the request keeps {need} entries per KV head (its kept prompt + max_new_tokens) and a slot holds "
                    f"{self.capacity} (set by --method, --budget and --max-new-tokens): lower the request's budget or "
                    "max_new_tokens, or raise those flags")
        return None

    @torch.no_grad()
    def run(self, requests: list[Request], on_done, clock: Clock | None = None):
        """Serve `requests` (sorted by arrival) to the end; `on_done(record)` gets each answer's record."""
        clock = clock or Clock()
        queue = sorted(requests, key=lambda r: r.arrival)
        job = None  # (request, prefill generator, slot)
        filling = True  # static batches: a batch is being admitted (nothing decodes meanwhile)
        while queue or job or any(self.slots):
            free = [b for b, s in enumerate(self.slots) if s is None]
            filling = filling or len(free) == len(self.slots)
            if job is None and queue and free and (filling or not self.static):
                if not any(self.slots) and queue[0].arrival > clock.now():
                    clock.wait_until(queue[0].arrival)
                if queue[0].arrival <= clock.now():
                    req = queue.pop(0)
                    job = (req, self.start_prefill(req), free[0])
            if job is not None:
                job = self.prefill_step(job, clock, on_done)
                if self.static and job is None:  # one more in: the batch is complete once full or nobody waits
                    filling = None in self.slots and bool(queue) and queue[0].arrival <= clock.now()
            elif self.static and any(self.slots):  # nobody to admit now: the batch starts decoding
                filling = False
            if any(self.slots) and not (self.static and filling):
                self.decode_step(clock, on_done)
            self.peak = max(self.peak, sum(s is not None for s in self.slots))

    def start_prefill(self, req: Request):
        ids = torch.tensor([req.ids], device=self.device)
        return D.prefill_chunks(self.model, ids, chunk=self.chunk, keep_queries=req.cfg.obs_window,
                                h2o=req.cfg.needs_mass)

    def prefill_step(self, job, clock: Clock, on_done):
        """One chunk of the admitted request's prefill; after the last, its eviction and its slot."""
        req, chunks, slot = job
        t = time.perf_counter()
        try:
            next(chunks)
            sync(self.device)  # on CUDA, the chunk's time is the GPU's, not its launches'
            self.prefill_s += time.perf_counter() - t
            return job
        except StopIteration as done:
            pre = done.value
        sync(self.device)
        self.prefill_s += time.perf_counter() - t
        t = time.perf_counter()
        if self.evictor is None:  # PyramidKV / Ada-KV: no layer or head keeps more than the slot holds besides the answer
            cfg = replace(req.cfg, cap=max(self.capacity - req.max_new_tokens, req.cfg.budget))
        else:  # the prompt keeps at most the limit, as generate.py --cache-limit does
            cfg = replace(req.cfg, budget=self.kept_budget(req), cap=self.capacity)
        cache, _ = D.evict(cfg, self.model, pre, eos_ids=self.tok.eos_ids)
        self.cache.load(slot, cache)
        if self.evictor is not None:
            self.evictor.admit(slot, self.cache, pre.obs, pre.cache.pos)
        sync(self.device)
        self.evict_s += time.perf_counter() - t
        first = int(sample(pre.obs.logits, self.sampling, self.gen)[0])
        act = Active(req, int(pre.obs.next_pos[0]), first, times=[clock.now()])
        self.slots[slot] = act
        if self.append(act, first):
            self.finish(slot, clock, on_done)
        return None

    def kept_budget(self, req: Request) -> int:
        """The budget the request's prompt was evicted with: a cache limit below it is what the prompt keeps."""
        return req.cfg.budget if self.evictor is None else min(req.cfg.budget, self.capacity)

    def append(self, act: Active, token: int) -> bool:
        """Add a token to a request's answer; whether the request is finished."""
        if token in self.tok.eos_ids:
            if not self.ignore_eos:
                return True
            act.eos_at = len(act.out) if act.eos_at is None else act.eos_at
        act.out.append(token)
        return len(act.out) >= act.req.max_new_tokens

    def decode_step(self, clock: Clock, on_done):
        """One token for every active slot, in one batched step; free slots feed a dummy token at
        position 0 that is dropped at once."""
        t = time.perf_counter()
        if self.evictor is not None:  # a full slot makes room for this step's entry (each slot as alone)
            self.evictor(self.cache, 1)
            self.evict_s += time.perf_counter() - t
            t = time.perf_counter()
        active = torch.tensor([s is not None for s in self.slots], device=self.device)
        tokens = torch.tensor([[s.token if s else 0] for s in self.slots], device=self.device)  # [S, 1]
        pos = torch.tensor([[s.pos if s else 0] for s in self.slots], device=self.device)  # [S, 1]
        logits = self.step(tokens, pos, self.cache)[0]  # [S, V]
        if not active.all():
            self.cache.clear(~active)
        nxt = sample(logits, self.sampling, self.gen).tolist()
        self.decode_s += time.perf_counter() - t
        now = clock.now()
        for b, s in enumerate(self.slots):
            if s is None:
                continue
            s.pos, s.token = s.pos + 1, nxt[b]
            s.times.append(now)
            if self.append(s, nxt[b]):
                self.finish(b, clock, on_done)

    def finish(self, slot: int, clock: Clock, on_done):
        s = self.slots[slot]
        self.slots[slot] = None
        self.cache.clear(torch.arange(len(self.slots), device=self.device) == slot)
        gaps = [b - a for a, b in zip(s.times, s.times[1:])]
        on_done({"id": s.req.id, "line": s.req.line, "text": self.tok.decode(s.out[:s.eos_at]), "token_ids": s.out,
                 "method": s.req.cfg.method,
                 "budget": self.kept_budget(s.req) if s.req.cfg.method != "full" else None,
                 "prompt_tokens": len(s.req.ids), "new_tokens": len(s.out), "arrival_s": s.req.arrival,
                 "ttft_s": s.times[0] - s.req.arrival, "latency_s": s.times[-1] - s.req.arrival,
                 "itl_ms": [1000 * g for g in gaps]})


def plan_slots(model, requests: list[Request], kv_memory: int, default: lqc.EvictConfig, max_new_tokens: int,
               kv_bits: int | None = None, cache_limit: int | None = None) -> tuple:
    """(slots that fit, capacity): a slot holds what the default policy keeps plus an answer: the
    longest request for the full cache; when evicting, the budget (PyramidKV: its widest layer)
    plus max_new_tokens; with a cache limit, the limit. Ada-KV's heads are cut to the budget in a
    slot (`Server.prefill_step`): its widest head depends on the prompt, a static slot cannot."""
    if cache_limit is not None:
        capacity = cache_limit
    elif default.method == "full":
        capacity = max((r.holds(model.args.n_layers) for r in requests), default=max_new_tokens)
    else:
        capacity = default.entry.widest(default, model.args.n_layers) + max_new_tokens
    per_slot = slot_bytes(model, capacity, kv_bits)
    slots = kv_memory // per_slot
    if slots < 1:
        lower = "--cache-limit" if cache_limit is not None else "--budget / --max-new-tokens"
        raise BadInput(f"--kv-memory {kv_memory / 1e3:,.0f} KB holds no slot: one slot of {capacity} entries takes "
                       f"{per_slot / 1e3:,.0f} KB with this model; raise it, or lower {lower}")
    return int(slots), capacity


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = cli.ArgParser(description="Serve a stream of requests in a fixed KV memory with continuous batching. Bad input "
                                  "ends with one line on stderr and exit code 2; a bad request line gets an error "
                                  "record in --out and the others go on.")
    p.add_argument("--ckpt", default="smollm2", help="short name (smollm2, qwen0.5b, ...), .gguf file, HF directory or hub id")
    p.add_argument("--requests", help='JSONL, one request a line: {"id": ..., "prompt": "..."} or {"id": ..., "messages": '
                                      '[{"role": "user", "content": "..."}]}, optionally with its own "method", "budget", '
                                      '"max_new_tokens", "arrival" (seconds); not with --bench')
    p.add_argument("--out", help="JSONL of answers, one line per request as it finishes; a rerun skips the lines already "
                                 "answered there, whatever flags answered them (use a new file for new flags)")
    p.add_argument("--kv-memory", default="256MB", help="bytes for the KV cache of all slots together (e.g. 64MB, 1.5GB)")
    p.add_argument("--method", default="laqpp", choices=lqc.method_names(),
                   help="the eviction policy of requests that name none")
    p.add_argument("--budget", type=int, default=256,
                   help="kept prompt entries per KV head per layer, for requests that give none")
    p.add_argument("--window", type=int, default=32, help="observation / recent window, as in generate.py")
    p.add_argument("--window-laqpp", type=int, default=8, help="prompt-suffix queries of LAQ++")
    p.add_argument("--lookahead", type=int, default=8, help="pseudo tokens of LAQ / LAQ++")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length of requests that give none, > 0")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward; running requests "
                                                                   "decode one token between two chunks")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the checkpoint's chat format (when it has one)")
    p.add_argument("--kv-bits", type=int, default=None, choices=[8],
                   help="8: int8 K/V entries in the slots (as generate.py --kv-bits 8): about 3.8x the slots of float32")
    p.add_argument("--cache-limit", type=int, default=None,
                   help="bounded slots: a slot holds this many entries per KV head, and a request evicts while decoding "
                        "once its slot is full (--method's rule, as generate.py --cache-limit); not with --bench")
    p.add_argument("--evict-every", type=int, default=EVICT_EVERY,
                   help="with --cache-limit: entries freed per decode-time eviction")
    p.add_argument("--compile", action="store_true", help="torch.compile the batched decode step (one shape: no recompiles)")
    p.add_argument("--static-batches", action="store_true",
                   help="admit a new batch only when every slot is free (the padded static batching baseline)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights, activations and KV entries (unless --kv-bits 8)")
    b = p.add_argument_group(
        "--bench: the economics table on generated RULER-style requests",
        "Each row serves the same stream in the same --kv-memory; every request decodes --max-new-tokens "
        "(EOS ignored, as serving benchmarks do; the answer is scored up to its first EOS). Columns: slots that fit, "
        "requests served, peak concurrent requests, tok_s (new tokens / the stream's makespan), decode_tok_s (new "
        "tokens / time in decode steps), time to first token and inter-token latency (p50 / p95, s and ms), the "
        "shares of the makespan spent in prefill and in eviction, and acc (RULER's string_match_all, mean).")
    b.add_argument("--bench", action="store_true", help="run the rows below on one request stream, print a table")
    b.add_argument("--length", type=int, default=2048, help="prompt tokens of the generated requests")
    b.add_argument("--requests-n", type=int, default=16, help="number of generated requests")
    b.add_argument("--rates", nargs="+", type=float, default=[0.5, math.inf],
                   help="Poisson arrival rates in requests per second (inf: all at once)")
    b.add_argument("--peers", action="store_true",
                   help="also transformers generate on the same requests (full cache, padded batches of the size the "
                        "same memory allows, all at once)")
    b.add_argument("--rows", nargs="+", default=["full", "snapkv:256", "laqpp:256", "laqpp:512"],
                   help="method:budget per row (full: no budget); static: prefix for --static-batches")
    return p.parse_args(argv)


def check_args(args, notes: list) -> lqc.EvictConfig:
    """Every flag, and --requests / --out, before any model work."""
    cli.positive("--max-new-tokens", args.max_new_tokens)
    cli.positive("--prefill-chunk", args.prefill_chunk)
    cli.check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if args.bench == (args.requests is not None):
        raise BadInput("give --requests FILE.jsonl, or --bench for generated requests")
    if args.requests is not None and args.out is None:
        raise BadInput("--requests needs --out FILE.jsonl for the answers")
    args.kv_bytes = parse_size(args.kv_memory)
    if args.peers and importlib.util.find_spec("transformers") is None:
        raise BadInput("--peers needs transformers: pip install -r requirements-hf.txt")
    args.flags = {k: getattr(args, k) for k in ("method", "budget", "window", "window_laqpp", "lookahead", "max_new_tokens",
                                              "cache_limit")}
    cli.positive("--evict-every", args.evict_every)  # checked with or without --cache-limit, as in generate.py
    cfg = cli.evict_config(method=args.method, budget=args.budget, window=args.window, window_laqpp=args.window_laqpp,
                           lookahead=args.lookahead, notes=notes, cache_limit=args.cache_limit)
    if args.cache_limit is not None:
        if args.bench:
            raise BadInput("--cache-limit applies to --requests: --bench rows size their slots by method and budget")
        check_limit(cfg, args.cache_limit, args.evict_every, None, kv_bits=args.kv_bits)
        if args.budget > args.cache_limit:
            notes.append(f"--budget {args.budget} > --cache-limit {args.cache_limit}: prompts keep at most "
                         f"{args.cache_limit} entries per KV head (the records say so)")
    if args.bench:
        check_bench(args)
    if args.requests is not None:
        args.out_path = Path(args.out)
        if args.out_path.is_dir():
            raise BadInput(f"--out {args.out} is a directory: give a file name")
        if not args.out_path.parent.is_dir():
            raise BadInput(f"--out {args.out}: no directory {args.out_path.parent}")
        args.done = answered_lines(args.out_path)
        args.requests_text = cli.read_file_text(args.requests, "--requests")
    return cfg


def answered_lines(path: Path) -> set:
    """Request lines already answered in --out: a rerun skips them (refused lines are tried again,
    since a refusal may depend on this run's flags; the last record of a line is the one that counts)."""
    done = set()
    try:
        lines = cli.whole_lines(path)
    except OSError as e:
        raise BadInput(f"cannot read --out {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise BadInput(f"--out {path} line {n} is not JSON: not an answers file of serve.py; use another --out") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("line"), int):
            raise BadInput(f"--out {path} line {n} has no 'line' number: not an answers file of serve.py; use another --out")
        if "text" in rec:
            done.add(rec["line"])
    return done


def serve(args, cfg, model, tok):
    out, done = args.out_path, args.done
    requests, errors = read_requests(args.requests_text, tok, args.flags, args.chat)
    requests = [r for r in requests if r.line not in done]
    n_slots, capacity = plan_slots(model, [r for r in requests if r.within(model.args.max_seq_len)], args.kv_bytes,
                                   cfg, args.max_new_tokens, args.kv_bits, args.cache_limit)
    # no more slots than requests: a slot no request can take would cost a dummy row in every step
    server = Server(model, tok, n_slots=max(1, min(n_slots, len(requests))), capacity=capacity,
                    prefill_chunk=args.prefill_chunk, sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
                    compile=args.compile, static=args.static_batches, kv_bits=args.kv_bits,
                    limit_cfg=cfg if args.cache_limit is not None else None, evict_every=args.evict_every)
    refusals = {r.line: server.fits(r) for r in requests}
    errors += [{"id": r.id, "line": r.line, "error": f"line {r.line}: {refusals[r.line]}"} for r in requests if refusals[r.line]]
    for e in sorted(errors, key=lambda e: e["line"]):
        cli.append_line(out, e)
    ok = [r for r in requests if refusals[r.line] is None]
    cli.note("serve.py", f"{n_slots} slots of {capacity} entries per KV head ({n_slots * slot_bytes(model, capacity, args.kv_bits) / 1e6:.1f} "
                         f"MB of --kv-memory); {len(ok)} request{'s' * (len(ok) != 1)} to serve, {len(errors)} refused, "
                         f"{len(done)} answered in --out before (kept, whatever flags answered them)")
    finished = [0]

    def on_done(rec):
        cli.append_line(out, rec)
        finished[0] += 1
        if tty:
            print(f"\r{finished[0]}/{len(ok)} answered", end="", file=sys.stderr, flush=True)
    tty = sys.stderr is not None and sys.stderr.isatty()
    server.run(ok, on_done)
    if tty:
        print(file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# --bench: the economics table

def percentile(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@dataclass
class Row:
    cfg: lqc.EvictConfig
    static: bool = False  # static batches
    kv_bits: int | None = None

    @property
    def name(self) -> str:
        budget = "" if self.cfg.method == "full" else f" {self.cfg.budget}"
        return ("static " if self.static else "") + self.cfg.method + budget + (" int8" if self.kv_bits else "")


def parse_row(text: str, flags: dict) -> Row:
    """'laqpp:256' -> a Row; a 'static:' prefix is static batching, a '+int8' suffix int8 entries."""
    static, int8 = text.startswith("static:"), text.endswith("+int8")
    method, _, budget = text.removeprefix("static:").removesuffix("+int8").partition(":")
    if method not in lqc.method_names() or (method != "full") != bool(budget) or budget and not budget.isdigit():
        raise BadInput(f"--rows {text!r}: give method:budget (e.g. laqpp:256) or full, with an optional static: prefix "
                       "(static batches) and +int8 suffix (int8 entries)")
    cfg = cli.evict_config(method=method, budget=int(budget or flags["budget"]), window=flags["window"],
                           window_laqpp=flags["window_laqpp"], lookahead=flags["lookahead"])
    return Row(cfg, static, 8 if int8 else None)


def bench_row(model, tok, requests, row: Row, args) -> dict:
    n_slots, capacity = plan_slots(model, requests, args.kv_bytes, row.cfg, args.max_new_tokens, row.kv_bits)
    server = Server(model, tok, n_slots=max(1, min(n_slots, len(requests))), capacity=capacity,
                    prefill_chunk=args.prefill_chunk, compile=args.compile, static=row.static, ignore_eos=True,
                    kv_bits=row.kv_bits)
    records, clock = [], Clock()
    server.run([r for r in requests if server.fits(r) is None], records.append, clock)
    span = clock.now()
    expected = {r.id: r.expected for r in requests}
    itl = [g for rec in records for g in rec["itl_ms"]]
    ttft = [rec["ttft_s"] for rec in records]
    acc = [ruler.score(rec["text"], expected[rec["id"]]) for rec in records]
    allocated = sum(b.untyped_storage().nbytes() for b in server.cache.buffers())
    new_tokens = sum(r["new_tokens"] for r in records)
    return {"slots": n_slots, "capacity": capacity, "kv_MB": allocated / 1e6,
            "served": len(records), "peak": server.peak, "tok_s": new_tokens / span,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(itl, 0.5), "itl_p95": percentile(itl, 0.95),
            "decode_tok_s": new_tokens / server.decode_s if server.decode_s else float("nan"),
            "prefill_share": server.prefill_s / span, "evict_share": server.evict_s / span,
            "acc": statistics.mean(acc) if acc else float("nan"), "span_s": span}


COLUMNS = [("slots", "{:d}"), ("kv_MB", "{:.0f}"), ("served", "{:d}"), ("peak", "{:d}"), ("tok_s", "{:.1f}"), ("decode_tok_s", "{:.1f}"),
           ("ttft_p50", "{:.1f}"),
           ("ttft_p95", "{:.1f}"), ("itl_p50", "{:.0f}"), ("itl_p95", "{:.0f}"), ("prefill_share", "{:.0%}"),
           ("evict_share", "{:.1%}"), ("acc", "{:.2f}")]


@torch.no_grad()
def transformers_row(model, tok, requests, args) -> dict:
    """The peer: transformers `generate` (full cache, greedy, --max-new-tokens each, EOS ignored) on the
    same prompt ids, all at once, in left-padded static batches of as many requests as --kv-memory
    holds with the full cache in lqc's slots (transformers allocates its own cache; this sizes
    the batch the same memory allows)."""
    import transformers
    from bench import load_peer
    transformers.logging.set_verbosity_error()
    device = model.tok_embeddings.weight.device
    hf = load_peer(args.ckpt, model.tok_embeddings.weight.dtype).to(device)
    n_slots, _ = plan_slots(model, requests, args.kv_bytes, lqc.EvictConfig(method="full"), args.max_new_tokens)
    expected = {r.id: r.expected for r in requests}
    t0, texts, first = time.perf_counter(), {}, []
    for i in range(0, len(requests), n_slots):
        batch = requests[i:i + n_slots]
        x, pad = D.left_pad([r.ids for r in batch], device)
        mask = (torch.arange(x.shape[1], device=device)[None] >= pad[:, None]).long()
        out = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
        first.append(time.perf_counter() - t0)  # the batch's answers come together
        for r, row in zip(batch, out[:, x.shape[1]:].tolist()):
            stop = next((j for j, t in enumerate(row) if t in tok.eos_ids), len(row))
            texts[r.id] = tok.decode(row[:stop])
    span = time.perf_counter() - t0
    acc = [ruler.score(texts[r.id], expected[r.id]) for r in requests]
    return {"slots": n_slots, "served": len(requests), "peak": min(n_slots, len(requests)),
            "tok_s": len(requests) * args.max_new_tokens / span, "latency_p50": percentile(first, 0.5),
            "acc": statistics.mean(acc), "span_s": span}


def check_bench(args):
    """--bench's flags, before any model work."""
    args.row_list = [parse_row(r, args.flags) for r in args.rows]
    cli.positive("--length", args.length)
    cli.positive("--requests-n", args.requests_n)
    if any(not (r > 0) for r in args.rates):
        raise BadInput("--rates must be > 0 requests per second (inf: all at once)")


def bench_requests(tok, args, rate: float, cfg: lqc.EvictConfig) -> list[Request]:
    """The --bench stream: every answer --max-new-tokens long (one load for every row)."""
    reqs = suite_requests(tok, n=args.requests_n, length=args.length, rate=rate, default=cfg)
    return [replace(r, max_new_tokens=args.max_new_tokens) for r in reqs]


def bench(args, default, model, tok):
    out = Path(args.out) if args.out else None

    def save():
        if out:
            # the flags as given (row_list holds their parsed Rows)
            cli.write_json(out, {"args": {k: v for k, v in vars(args).items() if k != "row_list"}, "rows": results})
    for row in args.row_list:  # every row's slots before the table starts: a row that fits none is one line
        plan_slots(model, bench_requests(tok, args, math.inf, row.cfg), args.kv_bytes, row.cfg, args.max_new_tokens,
                   row.kv_bits)
    print(f"serve.py --bench: {args.ckpt}, {args.requests_n} requests of ~{args.length} tokens, "
          f"--kv-memory {args.kv_memory}, answers up to {args.max_new_tokens} tokens\n")
    print("| rate/s | row | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    results = []
    for rate in args.rates:
        for row in args.row_list:
            res = bench_row(model, tok, bench_requests(tok, args, rate, row.cfg), row, args)
            results.append({"rate": rate, "row": row.name, **res})
            print(f"| {rate:g} | {row.name} | " + " | ".join(f.format(res[c]) for c, f in COLUMNS) + " |", flush=True)
            save()
    if args.peers:  # all at once, as the peer serves a batch: compare with the rows at rate inf
        res = transformers_row(model, tok, bench_requests(tok, args, math.inf, default), args)
        results.append({"rate": math.inf, "row": "transformers full (static batches)", **res})
        print(f"\ntransformers generate, full cache, left-padded batches of {res['slots']} (all at once): "
              f"{res['tok_s']:.1f} tok/s over {res['span_s']:.0f} s, acc {res['acc']:.2f}", flush=True)
        save()
    return results


def main(args):
    notes = []
    cfg = check_args(args, notes)
    dev, dt = cli.check_device(args.device, args.dtype)
    for line in notes:  # all input is checked: what lqc does with it
        cli.note("serve.py", line)
    model, tok = load(args.ckpt, dev, dt)
    if args.bench:
        return bench(args, cfg, model, tok)
    serve(args, cfg, model, tok)


if __name__ == "__main__":
    cli.exit_on_bad_input("serve.py", main, parse_args())
