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

import generate as G
import lqc
import model as M
import ruler
from checkpoint import load
from cli import BadInput
from sampling import Sampling, sample
from steps import make_step

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'1.5GB', '64MB', '512MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m and (m.group(2).upper() or "B")
    if not m or unit not in UNITS:
        raise BadInput(f"--kv-memory {text!r}: give a size such as 64MB, 1.5GB or 512MiB")
    return int(float(m.group(1)) * UNITS[unit])


def slot_bytes(model, capacity: int, kv_bits: int | None = None) -> int:
    """Bytes of one slot of the static cache: per layer and KV head, `capacity` entries of K and V in
    the model's dtype and an int64 position each, plus an int64 length. int8 (kv_bits=8): D codes and
    a float32 scale per entry for K and V, plus a float32 key scale per channel."""
    a = model.args
    if kv_bits == 8:
        entry, fixed = 2 * (a.head_dim + 4) + 8, 8 + 4 * a.head_dim
    else:
        entry, fixed = 2 * a.head_dim * model.tok_embeddings.weight.element_size() + 8, 8
    return a.n_layers * a.n_kv_heads * (capacity * entry + fixed)


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

    def holds(self) -> int:
        """Cache entries per KV head the request needs: its kept prompt plus its answer."""
        kept = len(self.ids) if self.cfg.method == "full" else min(len(self.ids), self.cfg.budget)
        return kept + self.max_new_tokens


def request_text(r: dict, where: str) -> tuple[str, str | None]:
    """(user text, system text or None) of one request object."""
    if "prompt" in r:
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise BadInput(f"{where}: 'prompt' must be a non-empty string")
        return cli.check_utf8(r["prompt"], f"{where}: 'prompt'"), None
    msgs = r.get("messages")
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)):
        raise BadInput(f"{where}: give 'prompt' (a string) or 'messages' (a list of {{role, content}})")
    roles = [m.get("role") for m in msgs]
    if roles not in (["user"], ["system", "user"]) or not all(isinstance(m.get("content"), str) for m in msgs):
        raise BadInput(f"{where}: 'messages' must be one user message, optionally after one system message, each "
                       "with a string 'content' (one turn: lqc serves single-turn requests)")
    return cli.check_utf8(msgs[-1]["content"], f"{where}: user content"), (
        cli.check_utf8(msgs[0]["content"], f"{where}: system content") if len(msgs) == 2 else None)


def parse_request(line: str, n: int, tok, default: lqc.EvictConfig, max_new_tokens: int, chat: bool) -> Request:
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
    method, budget = r.get("method", default.method), r.get("budget", default.budget)
    if method not in lqc.method_names() or not (isinstance(budget, int) and not isinstance(budget, bool)):
        raise BadInput(f"{where}: 'method' must be one of {', '.join(lqc.method_names())} and 'budget' an integer")
    try:  # the window rule as on the command line: a window above the request's budget is clamped to it
        cfg = cli.evict_config(method=method, budget=budget, window=default.window, window_laqpp=default.window_laqpp,
                               lookahead=default.lookahead, kernel=default.kernel, pool=default.pool)
    except BadInput as e:
        raise BadInput(f"{where}: {e} (the request's 'budget')") from None
    max_new = r.get("max_new_tokens", max_new_tokens)
    arrival = r.get("arrival", 0.0)
    if not (isinstance(max_new, int) and not isinstance(max_new, bool) and max_new > 0):
        raise BadInput(f"{where}: 'max_new_tokens' must be an integer > 0")
    if not (isinstance(arrival, (int, float)) and not isinstance(arrival, bool) and math.isfinite(arrival)
            and arrival >= 0):
        raise BadInput(f"{where}: 'arrival' must be a number of seconds >= 0")
    ids = tok.prompt_ids(text, chat=chat and tok.chat_format is not None, system=system)
    return Request(r["id"], n, ids, cfg, max_new, float(arrival))


def read_requests(path: str, tok, default, max_new_tokens, chat) -> tuple[list[Request], list[dict]]:
    """The requests of a JSONL file and an error record for each line that is not one."""
    text = cli.read_file_text(path, "--requests")
    requests, errors = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            requests.append(parse_request(line, n, tok, default, max_new_tokens, chat))
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
    `static=True`: a new batch is admitted only when every slot is free (padded static batches)."""

    def __init__(self, model, tok, *, n_slots: int, capacity: int, prefill_chunk: int = 512,
                 sampling: Sampling = Sampling(), compile: bool = False, static: bool = False, ignore_eos: bool = False,
                 kv_bits: int | None = None):
        a, device = model.args, model.tok_embeddings.weight.device
        self.model, self.tok, self.chunk, self.sampling, self.static = model, tok, prefill_chunk, sampling, static
        self.ignore_eos = ignore_eos  # every request decodes max_new_tokens (a throughput benchmark's load)
        self.cache = M.StaticKVCache(a.n_layers, n_slots, a.n_kv_heads, capacity, a.head_dim, a.n_heads // a.n_kv_heads,
                                     model.tok_embeddings.weight.dtype, device, flex=False, kv_bits=kv_bits)
        self.step = make_step(model, compile)
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
        if len(req.ids) + req.max_new_tokens > ctx:
            return (f"prompt ({len(req.ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's "
                    f"context of {ctx}")
        if req.holds() > self.capacity:
            return (f"the request keeps {req.holds()} entries per KV head (kept prompt + max_new_tokens) and a slot "
                    f"holds {self.capacity}: raise --kv-memory or use an evicting method with a smaller budget")
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
            if self.static and job is None:  # the batch is complete once every slot is taken or nobody waits
                filling = None in self.slots and bool(queue) and queue[0].arrival <= clock.now()
            if any(self.slots) and not (self.static and filling):
                self.decode_step(clock, on_done)
            self.peak = max(self.peak, sum(s is not None for s in self.slots))

    def start_prefill(self, req: Request):
        ids = torch.tensor([req.ids], device=self.device)
        return G.prefill_chunks(self.model, ids, chunk=self.chunk, keep_queries=req.cfg.obs_window,
                                h2o=req.cfg.needs_mass)

    def prefill_step(self, job, clock: Clock, on_done):
        """One chunk of the admitted request's prefill; after the last, its eviction and its slot."""
        req, chunks, slot = job
        t = time.perf_counter()
        try:
            next(chunks)
            self.prefill_s += time.perf_counter() - t
            return job
        except StopIteration as done:
            pre = done.value
        self.prefill_s += time.perf_counter() - t
        t = time.perf_counter()
        # PyramidKV / Ada-KV: no layer or head keeps more than the slot holds besides the answer
        cfg = replace(req.cfg, cap=max(self.capacity - req.max_new_tokens, req.cfg.budget))
        cache, _ = G.evict(cfg, self.model, pre, eos_ids=self.tok.eos_ids)
        self.cache.load(slot, cache)
        self.evict_s += time.perf_counter() - t
        first = int(sample(pre.obs.logits, self.sampling, self.gen)[0])
        act = Active(req, int(pre.obs.next_pos[0]), first, times=[clock.now()])
        self.slots[slot] = act
        if self.append(act, first):
            self.finish(slot, clock, on_done)
        return None

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
                 "budget": s.req.cfg.budget if s.req.cfg.method != "full" else None,
                 "prompt_tokens": len(s.req.ids), "new_tokens": len(s.out), "arrival_s": s.req.arrival,
                 "ttft_s": s.times[0] - s.req.arrival, "latency_s": s.times[-1] - s.req.arrival,
                 "itl_ms": [1000 * g for g in gaps]})


def plan_slots(model, requests: list[Request], kv_memory: int, default: lqc.EvictConfig, max_new_tokens: int,
               kv_bits: int | None = None) -> tuple:
    """(slots, capacity): a slot holds what the default policy keeps plus an answer: the longest
    request for the full cache, budget + max_new_tokens when evicting."""
    if default.method == "full":
        capacity = max((len(r.ids) + r.max_new_tokens for r in requests), default=max_new_tokens)
    else:
        capacity = default.budget + max_new_tokens
    per_slot = slot_bytes(model, capacity, kv_bits)
    slots = kv_memory // per_slot
    if slots < 1:
        raise BadInput(f"--kv-memory {kv_memory / 1e6:.1f} MB holds no slot: one slot of {capacity} entries takes "
                       f"{per_slot / 1e6:.1f} MB with this model; raise it, or lower --budget / --max-new-tokens")
    return int(slots), capacity


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = cli.ArgParser(description="Serve a stream of requests in a fixed KV memory with continuous batching. Bad input "
                                  "ends with one line on stderr and exit code 2; a bad request line gets an error "
                                  "record in --out and the others go on.")
    p.add_argument("--ckpt", default="smollm2", help="short name (smollm2, qwen0.5b, ...), .gguf file, HF directory or hub id")
    p.add_argument("--requests", help="JSONL of requests (see the module docstring); not with --bench")
    p.add_argument("--out", help="JSONL of answers, one line per request as it finishes; a rerun skips answered lines")
    p.add_argument("--kv-memory", default="256MB", help="bytes for the KV cache of all slots together (e.g. 64MB, 1.5GB)")
    p.add_argument("--method", default="laqpp", choices=lqc.method_names(), help="the default eviction policy")
    p.add_argument("--budget", type=int, default=256, help="the default kept prompt entries per KV head per layer")
    p.add_argument("--window", type=int, default=32, help="observation / recent window, as in generate.py")
    p.add_argument("--window-laqpp", type=int, default=8, help="prompt-suffix queries of LAQ++")
    p.add_argument("--lookahead", type=int, default=8, help="pseudo tokens of LAQ / LAQ++")
    p.add_argument("--max-new-tokens", type=int, default=128, help="the default answer length, > 0")
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
    p.add_argument("--compile", action="store_true", help="torch.compile the batched decode step (one shape: no recompiles)")
    p.add_argument("--static-batches", action="store_true",
                   help="admit a new batch only when every slot is free (the padded static batching baseline)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
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
    b.add_argument("--rows", nargs="+", default=["full", "snapkv:256", "laqpp:256", "laqpp:512"],
                   help="method:budget per row (full: no budget); static: prefix for --static-batches")
    return p.parse_args(argv)


def check_args(args) -> lqc.EvictConfig:
    cli.positive("--max-new-tokens", args.max_new_tokens)
    cli.positive("--prefill-chunk", args.prefill_chunk)
    cli.check_sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if args.bench == (args.requests is not None):
        raise BadInput("give --requests FILE.jsonl, or --bench for generated requests")
    if args.requests is not None and args.out is None:
        raise BadInput("--requests needs --out FILE.jsonl for the answers")
    args.kv_bytes = parse_size(args.kv_memory)
    return cli.evict_config(method=args.method, budget=args.budget, window=args.window, window_laqpp=args.window_laqpp,
                            lookahead=args.lookahead, notes=[])


def answered_lines(path: Path) -> set:
    """Request lines already in --out (answers and errors): a rerun skips them."""
    done = set()
    for n, line in enumerate(cli.whole_lines(path), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise BadInput(f"--out {path} line {n} is not JSON: not an answers file of serve.py; use another --out") from None
        if not isinstance(rec, dict) or "line" not in rec:
            raise BadInput(f"--out {path} line {n} has no 'line': not an answers file of serve.py; use another --out")
        done.add(rec["line"])
    return done


def serve(args, cfg, model, tok):
    out = Path(args.out)
    if out.is_dir():
        raise BadInput(f"--out {out} is a directory: give a file name")
    if not out.parent.is_dir():
        raise BadInput(f"--out {out}: no directory {out.parent}")
    done = answered_lines(out)
    requests, errors = read_requests(args.requests, tok, cfg, args.max_new_tokens, args.chat)
    requests = [r for r in requests if r.line not in done]
    errors = [e for e in errors if e["line"] not in done]
    n_slots, capacity = plan_slots(model, requests, args.kv_bytes, cfg, args.max_new_tokens, args.kv_bits)
    server = Server(model, tok, n_slots=n_slots, capacity=capacity, prefill_chunk=args.prefill_chunk,
                    sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed), compile=args.compile,
                    static=args.static_batches, kv_bits=args.kv_bits)
    for r in requests:
        why = server.fits(r)
        if why:
            errors.append({"id": r.id, "line": r.line, "error": why})
    for e in sorted(errors, key=lambda e: e["line"]):
        cli.append_line(out, e)
    ok = [r for r in requests if server.fits(r) is None]
    cli.note("serve.py", f"{n_slots} slots of {capacity} entries per KV head ({n_slots * slot_bytes(model, capacity, args.kv_bits) / 1e6:.1f} "
                         f"MB of --kv-memory); {len(ok)} requests to serve, {len(errors)} refused, {len(done)} done before")
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


def parse_row(text: str, default: lqc.EvictConfig) -> Row:
    """'laqpp:256' -> a Row; a 'static:' prefix is static batching, a '+int8' suffix int8 entries."""
    static, int8 = text.startswith("static:"), text.endswith("+int8")
    method, _, budget = text.removeprefix("static:").removesuffix("+int8").partition(":")
    if method not in lqc.method_names() or (method != "full") != bool(budget) or budget and not budget.isdigit():
        raise BadInput(f"--rows {text!r}: give method:budget (e.g. laqpp:256) or full, with an optional static: prefix "
                       "(static batches) and +int8 suffix (int8 entries)")
    cfg = cli.evict_config(method=method, budget=int(budget or default.budget), window=default.window,
                           window_laqpp=default.window_laqpp, lookahead=default.lookahead)
    return Row(cfg, static, 8 if int8 else None)


def bench_row(model, tok, requests, row: Row, args) -> dict:
    n_slots, capacity = plan_slots(model, requests, args.kv_bytes, row.cfg, args.max_new_tokens, row.kv_bits)
    server = Server(model, tok, n_slots=n_slots, capacity=capacity, prefill_chunk=args.prefill_chunk,
                    compile=args.compile, static=row.static, ignore_eos=True, kv_bits=row.kv_bits)
    records, clock = [], Clock()
    server.run([r for r in requests if server.fits(r) is None], records.append, clock)
    span = clock.now()
    expected = {r.id: r.expected for r in requests}
    itl = [g for rec in records for g in rec["itl_ms"]]
    ttft = [rec["ttft_s"] for rec in records]
    acc = [ruler.score(rec["text"], expected[rec["id"]]) for rec in records]
    allocated = sum(b.untyped_storage().nbytes() for b in server.cache.buffers())
    return {"slots": n_slots, "capacity": capacity, "kv_MB": allocated / 1e6,
            "served": len(records), "peak": server.peak, "tok_s": sum(r["new_tokens"] for r in records) / span,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "itl_p50": percentile(itl, 0.5), "itl_p95": percentile(itl, 0.95),
            "decode_tok_s": sum(r["new_tokens"] for r in records) / server.decode_s,
            "prefill_share": server.prefill_s / span, "evict_share": server.evict_s / span,
            "acc": statistics.mean(acc) if acc else float("nan"), "span_s": span}


COLUMNS = [("slots", "{:d}"), ("kv_MB", "{:.0f}"), ("served", "{:d}"), ("peak", "{:d}"), ("tok_s", "{:.1f}"), ("decode_tok_s", "{:.1f}"),
           ("ttft_p50", "{:.1f}"),
           ("ttft_p95", "{:.1f}"), ("itl_p50", "{:.0f}"), ("itl_p95", "{:.0f}"), ("prefill_share", "{:.0%}"),
           ("evict_share", "{:.1%}"), ("acc", "{:.2f}")]


def bench(args, default, model, tok):
    rows = [parse_row(r, default) for r in args.rows]
    cli.positive("--length", args.length)
    cli.positive("--requests-n", args.requests_n)
    if any(not (r > 0) for r in args.rates):
        raise BadInput("--rates must be > 0 requests per second (inf: all at once)")
    out = Path(args.out) if args.out else None
    print(f"serve.py --bench: {args.ckpt}, {args.requests_n} requests of ~{args.length} tokens, "
          f"--kv-memory {args.kv_memory}, answers up to {args.max_new_tokens} tokens\n")
    print("| rate/s | row | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    results = []
    for rate in args.rates:
        for row in rows:
            reqs = suite_requests(tok, n=args.requests_n, length=args.length, rate=rate, default=row.cfg)
            reqs = [replace(r, max_new_tokens=args.max_new_tokens) for r in reqs]  # one load: every answer as long
            res = bench_row(model, tok, reqs, row, args)
            results.append({"rate": rate, "row": row.name, **res})
            print(f"| {rate:g} | {row.name} | " + " | ".join(f.format(res[c]) for c, f in COLUMNS) + " |", flush=True)
            if out:
                cli.write_json(out, {"args": {k: v for k, v in vars(args).items()}, "rows": results})
    return results


def main(args):
    cfg = check_args(args)
    dev, dt = G.check_device(args.device, args.dtype)
    model, tok = load(args.ckpt, dev, dt)
    if args.bench:
        return bench(args, cfg, model, tok)
    serve(args, cfg, model, tok)


if __name__ == "__main__":
    cli.exit_on_bad_input("serve.py", main, parse_args())
