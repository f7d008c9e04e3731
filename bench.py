"""Speed and memory of eviction: prefill, eviction overhead, decode speed, KV bytes, peak memory.

    python bench.py                                  # SmolLM2, 1k-8k prompts (make bench)
    python bench.py --lengths 1024 2048 --budgets 128 --reps 3 --no-compile

Numbers, not tests: medians of --reps repetitions, printed as a table and saved as JSON. Times on
a shared machine are noisy; trust the ratios measured within one run.
  prefill_s           prefill of the prompt (chunked, full cache)
  evict_<m>           eviction time of method m as a share of prefill
  decode tok/s        single-token steps over the static compacted cache, eager and compiled
  kv_MB               K and V bytes kept (all layers), peak_MB: peak RSS (CPU) or max allocated (CUDA)
  prefill % mm        the machine's limit, measured at start: the prefill's FLOPs (the weights' 2 x params
                      per token, plus causal attention's QK and PV) over its time, as a share of this
                      machine's torch.mm rate (GFLOP/s of a 2048^3 product in --dtype); "weights" counts
                      the weight FLOPs only
  decode % bw         a decode step's bytes (every weight once, plus the kept K and V) x tok/s, as a
                      share of the measured copy bandwidth (a 256 MB clone, read + write)
  limit ratio         decode tok/s at the longest prompt with budget 256 / decode tok/s of a
                      256-token prompt with the full cache, the two measured in turn (1.0: the
                      long prompt costs nothing extra)
"""
from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import cli

if __name__ == "__main__":
    cli.quiet_ctrl_c()  # before the slow imports below

import torch

import decoding as D
import lqc
from cache_limit import EVICT_EVERY, check_limit
from checkpoint import load
from cli import BadInput
from steps import flex_available, make_step, model_step, sync, to_static

EVICT_METHODS = ("laq", "laqpp", "snapkv", "h2o")  # the default --methods: which to time (the paper's four), not a rule


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")



def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


@torch.no_grad()
def machine_limits(device, dtype, reps: int = 5) -> dict:
    """This machine's matmul rate (GFLOP/s of an n^3 torch.mm in dtype) and copy bandwidth (GB/s of a
    256 MB clone, read + write), medians of reps after one untimed run."""
    n = 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    x = torch.empty(2**28 // dtype.itemsize, device=device, dtype=dtype)
    mm, copy = [], []
    for i in range(reps + 1):
        _, dt = timed(lambda: a @ b, device)
        mm.append(2 * n**3 / dt / 1e9)
        _, dt = timed(x.clone, device)
        copy.append(2 * x.numel() * x.element_size() / dt / 1e9)
    return dict(matmul_gflop_s=statistics.median(mm[1:]), copy_gb_s=statistics.median(copy[1:]))


def matmul_params(model) -> int:
    """Weights of the layers' linear maps (what each prompt token multiplies; embeddings are lookups)."""
    return sum(p.numel() for name, p in model.layers.named_parameters() if p.ndim == 2)


def prefill_flops(model, n: int) -> tuple[float, float]:
    """(weight FLOPs, attention FLOPs) of a causal n-token prefill: 2 x params per token, and QK and
    PV over the n (n + 1) / 2 visible pairs per query head and layer."""
    a = model.args
    return 2 * n * matmul_params(model), 2 * 2 * a.n_layers * a.n_heads * a.head_dim * n * (n + 1) / 2


def step_bytes(model, cache) -> int:
    """Bytes one decode step reads at least: every weight once (the output matrix too) and the kept K
    and V; of an embedding that is not also the output matrix, one row."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    if not model.args.tie_embeddings:
        weights -= emb.numel() * emb.element_size()
    return weights + kv_bytes(cache)


def kv_bytes(cache) -> int:
    """Bytes of the K and V entries a cache holds (valid entries only)."""
    per_entry = 2 * cache.k[0].shape[-1] * cache.k[0].element_size()
    return int(cache.kept().sum()) * per_entry


@torch.no_grad()
def decode_tok_s(model, cache, logits, next_pos, steps: int, warmup: int, step) -> float:
    """Median single-token decode speed over `steps` timed steps after `warmup` untimed ones."""
    device = logits.device
    tok, times = logits.argmax(-1), []
    for i in range(warmup + steps):
        (out, _), dt = timed(lambda: step(tok[:, None], (next_pos + i)[:, None], cache), device)
        tok = out.argmax(-1)
        if i >= warmup:
            times.append(dt)
    return 1.0 / statistics.median(times)


QUESTION = " What did the baker repair?"


def prompt_ids(tok, n: int, seed: int = 0) -> list[int]:
    """A prompt of exactly n tokens (n > the question's tokens): varied filler (ruler.py's) with a
    question at the end."""
    import random
    from ruler import filler_sentences
    ids, fill, question = [], filler_sentences(random.Random(seed)), tok.encode(QUESTION)
    while len(ids) < n:
        ids += tok.encode(" " + next(fill))
    return ids[: n - len(question)] + question


@torch.no_grad()
def limit_reference(model, tok, device) -> D.Prefill:
    """The limit ratio's reference: a SHORT-token prompt with its full cache."""
    return D.prefill(model, torch.tensor([prompt_ids(tok, SHORT)], device=device))


@torch.no_grad()
def bench_length(model, tok, n, args, steps_fns, device, ref: D.Prefill | None = None) -> list[dict]:
    """Prefill, eviction and decode rows of one prompt length. With `ref`, each budget-256 row's
    decode repetitions alternate with the reference's (the limit ratio), so drift of this shared
    machine cannot pass for a difference."""
    ids = torch.tensor([prompt_ids(tok, n)], device=device)
    next_pos = torch.tensor([n], device=device)
    window = max(lqc.EvictConfig(method=m, window=args.window).obs_window for m in args.methods)  # queries to keep
    rows, prefill_s, evict_s = [], [], {m: {b: [] for b in args.budgets} for m in args.methods}
    caches = {}
    for rep in range(args.reps):
        peak_reset(device)
        pre, dt = timed(lambda: D.prefill(model, ids, chunk=args.prefill_chunk, keep_queries=window), device)
        prefill_s.append(dt)
        peak_prefill = peak_mb(device)
        for m in args.methods:
            state = pre
            if lqc.METHODS[m].needs_mass:
                mass = D.prefill(model, ids, chunk=args.prefill_chunk, h2o=True).obs.mass
                state = D.Prefill(pre.cache, replace(pre.obs, mass=mass))
            for b in args.budgets:
                cfg = cli.evict_config(method=m, budget=b, window=args.window)
                (cache, _), dt = timed(lambda: D.evict(cfg, model, state, eos_ids=tok.eos_ids), device)
                evict_s[m][b].append(dt)
                if rep == 0 and m == args.methods[0]:
                    caches[b] = cache
        caches["full"] = pre.cache
    med_prefill = statistics.median(prefill_s)
    for b in [*args.budgets, "full"]:
        row = dict(length=n, budget=b, prefill_s=med_prefill, prefill_tok_s=n / med_prefill, peak_prefill_MB=peak_prefill)
        for m in args.methods:
            if b != "full":
                row[f"evict_{m}"] = statistics.median(evict_s[m][b]) / med_prefill
        row["kv_MB"] = kv_bytes(caches[b]) / 2**20
        weight_flops, attn_flops = prefill_flops(model, n)
        row["prefill_weights_mm"] = weight_flops / med_prefill / 1e9 / args.limits["matmul_gflop_s"]
        row["prefill_mm"] = (weight_flops + attn_flops) / med_prefill / 1e9 / args.limits["matmul_gflop_s"]
        row["step_MB"] = step_bytes(model, caches[b]) / 2**20
        for name, (step, flex) in steps_fns.items():
            def speed(cache, logits, pos):
                static = to_static(model, cache, args.steps + args.warmup, flex=flex)
                peak_reset(device)
                return decode_tok_s(model, static, logits, pos, args.steps, args.warmup, step)
            speeds, ref_speeds = [], []
            for _ in range(args.reps):
                speeds.append(speed(caches[b], pre.obs.logits, next_pos))
                row[f"peak_decode_{name}_MB"] = peak_mb(device)
                if ref is not None and b == 256:
                    ref_speeds.append(speed(ref.cache, ref.obs.logits, ref.obs.next_pos))
            row[f"decode_{name}_tok_s"] = statistics.median(speeds)
            row[f"bw_{name}"] = row["step_MB"] * 2**20 * row[f"decode_{name}_tok_s"] / 1e9 / args.limits["copy_gb_s"]
            if ref_speeds:
                row[f"ref_decode_{name}_tok_s"] = statistics.median(ref_speeds)
        rows.append(row)
        print(format_row(row, args), file=sys.stderr)
    return rows


def e2e_runs(args) -> list[tuple[str, str, dict, str]]:
    """(label, method, run_batch options, label of the row it is compared with) per end-to-end row:
    snapkv (the reference) and every --methods method but those that need an instrumented prefill
    (H2O's mass), the lookahead methods also with reuse of their pseudo tokens; with
    --verify-draft-lens, full-cache decoding and `--verify full` (snapkv and laqpp drafting) per
    draft length."""
    runs = []
    for m in dict.fromkeys(["snapkv", *args.methods]):  # the reference first, each method once
        entry = lqc.METHODS[m]
        if not entry.needs_mass:
            runs.append((m, m, dict(reuse=False), "snapkv"))
        if entry.lookahead:
            runs.append((f"{m}+reuse", m, dict(reuse=True), "snapkv"))
    if args.verify_draft_lens:
        runs.append(("full", "full", {}, "full"))
        runs += [(f"{m} verify k={k}", m, dict(reuse=False, verify="full", draft_len=k), "full")
                 for k in args.verify_draft_lens for m in ("snapkv", "laqpp")]
    return runs


@torch.no_grad()
def bench_end_to_end(model, tok, n, args, device) -> list[dict]:
    """Prefill + evict + args.e2e_tokens greedy tokens (static cache, no EOS) per e2e_runs row:
    medians of --reps, and the ratio to its reference row (snapkv, or full for verify mode)."""
    ids, rows = prompt_ids(tok, n), []

    def run_fn(cfg, options):
        return lambda: timed(lambda: D.run(model, ids, cfg, max_new_tokens=args.e2e_tokens, fast=True,
                                           prefill_chunk=args.prefill_chunk, **options), device)
    plan = e2e_runs(args)
    key = lambda label, m, b: (label, None if m == "full" else b)  # the full cache's run does not depend on the budget
    runs = {}
    for b in args.budgets:
        for label, m, options, _ in plan:
            runs.setdefault(key(label, m, b), run_fn(lqc.EvictConfig(method=m, budget=b, window=args.window), options))
    results = interleaved(runs, args.reps)
    for b in args.budgets:
        for label, m, options, ref in plan:
            done = results[key(label, m, b)]
            (_, stats), _ = done[-1]
            rows.append(dict(length=n, budget=b, run=label, method=m, **options,
                             e2e_s=statistics.median(dt for _, dt in done),
                             drafted=stats.drafted, accepted=stats.accepted, ref=ref))
            rows[-1]["ratio"] = rows[-1]["e2e_s"] / next(r["e2e_s"] for r in rows if r["budget"] == b and r["run"] == ref)
            print(format_e2e(rows[-1], args), file=sys.stderr)
    return rows


def format_e2e(r, args) -> str:
    draft = f" draft {r['accepted']}/{r['drafted']}" if r["drafted"] else ""
    return (f"L={r['length']:>5} budget={r['budget']:>4} {r['run']}: "
            f"{r['e2e_s']:.2f} s to {args.e2e_tokens} tokens ({r['ratio']:.2f}x {r['ref']}){draft}")


def format_row(r, args) -> str:
    ev = " ".join(f"{m}={100 * r[f'evict_{m}']:.1f}%" for m in args.methods if f"evict_{m}" in r)
    dec = " ".join(f"{k[7:-6]}={v:.1f}" for k, v in r.items() if k.startswith("decode_"))
    return (f"L={r['length']:>5} budget={str(r['budget']):>4} prefill={r['prefill_s']:.2f}s ({r['prefill_tok_s']:.0f} tok/s) "
            f"evict[{ev}] decode tok/s[{dec}] kv={r['kv_MB']:.1f}MB")


def markdown(rows, args) -> str:
    names = [k for k in rows[0] if k.startswith("decode_")]
    bws = [k for k in rows[0] if k.startswith("bw_")]
    head = ["L", "budget", "prefill s", "prefill % mm (weights)", *[f"evict {m} %" for m in args.methods],
            *[n[7:] for n in names], *[f"decode % bw ({k[3:]})" for k in bws], "KV MB", "peak MB"]
    lines = [f"machine: torch.mm {args.limits['matmul_gflop_s']:.0f} GFLOP/s, copy {args.limits['copy_gb_s']:.1f} GB/s "
             f"(measured at start, {args.dtype})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["length"], r["budget"], f"{r['prefill_s']:.2f}",
                 f"{100 * r['prefill_mm']:.0f} ({100 * r['prefill_weights_mm']:.0f})",
                 *[f"{100 * r[f'evict_{m}']:.1f}" if f"evict_{m}" in r else "" for m in args.methods],
                 *[f"{r[n]:.1f}" for n in names], *[f"{100 * r[k]:.0f}" for k in bws], f"{r['kv_MB']:.1f}",
                 f"{max(v for k, v in r.items() if k.startswith('peak')):.0f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# int8 entries: which scale for the keys (--kv-error)

@torch.no_grad()
def kv_error_rows(model, tok, args, device) -> list[dict]:
    """Attention output error of int8 K/V against the float cache, per layer, on a --lengths[0]-token
    prompt with its last 16 queries, for three key scales (values per token in all): per token, per
    channel (over the prompt), per channel then per token (what `--kv-bits 8` stores)."""
    import model as M

    def per_token(x, pos=None):
        return M.dequantize(M.quantize(x), x.dtype)

    def per_channel(x, pos=None):
        scale = x.abs().amax(-2, keepdim=True).clamp(min=1e-12) / 127
        return (x / scale).round().clamp(-127, 127) * scale

    def per_channel_then_token(x, pos):
        scale = M.channel_scale(x, pos)
        return per_token(x / scale) * scale
    ids = torch.tensor([prompt_ids(tok, args.lengths[0])], device=device)
    pre = D.prefill(model, ids, keep_queries=16)
    keys = {"per token": per_token, "per channel": per_channel, "per channel, then per token": per_channel_then_token}
    rows = []
    for name, fn in keys.items():
        errs = []
        for k, v, p, q in zip(pre.cache.k, pre.cache.v, pre.cache.pos, pre.obs.obs_q):
            ref = M.grouped_attention(q, k, v, pre.obs.obs_pos, p)
            out = M.grouped_attention(q, fn(k, p), per_token(v), pre.obs.obs_pos, p)
            errs.append(((out - ref).norm() / ref.norm()).item())
        rows.append(dict(length=args.lengths[0], keys=name, mean_error=statistics.mean(errs), max_error=max(errs)))
    return rows


def kv_error_markdown(rows) -> str:
    lines = ["| L | key scale (values per token) | attention error, mean over layers | max over layers |",
             "|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['keys']} | {100 * r['mean_error']:.2f}% | {100 * r['max_error']:.2f}% |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Long answers: decoding with and without a cache limit

@torch.no_grad()
def limit_rows(model, tok, args, device) -> list[dict]:
    """--decode-tokens greedy tokens after a --lengths[0]-token prompt evicted to --budgets[0], over the
    static cache: the cache growing (no limit, first method) and bounded by --cache-limit (each method).
    Speed over the first and the last 64 tokens, KV entries held and allocated at the end, peak
    memory, decode-time eviction's share of decode time and its cost per eviction."""
    n, n_new, rows = args.lengths[0], args.decode_tokens, []
    ids = prompt_ids(tok, n)
    for method, limit in [(args.methods[0], None), *[(m, args.cache_limit) for m in args.methods]]:
        cfg = lqc.EvictConfig(method=method, budget=args.budgets[0], window=args.window)
        stamps, last = [], []
        inner = model_step(model)

        def step(t, p, c):
            last[:] = [c]
            return inner(t, p, c)
        peak_reset(device)
        _, stats = D.run_batch(model, [ids], cfg, max_new_tokens=n_new, eos_ids=(), fast=True, step=step, reuse=False,
                               on_token=lambda _: stamps.append(time.perf_counter()), cache_limit=limit,
                               evict_every=args.evict_every)
        k = min(64, len(stamps) // 2)
        cache = last[0]
        row = dict(length=n, method=method, limit=limit, new_tokens=n_new, evict_every=args.evict_every, speed_tokens=k,
                   first_tok_s=k / (stamps[k] - stamps[0]), last_tok_s=k / (stamps[-1] - stamps[-1 - k]),
                   decode_tok_s=stats.new_tokens / stats.decode_s, kv_MB=kv_bytes(cache) / 2**20,
                   kv_alloc_MB=sum(b.untyped_storage().nbytes() for b in cache.k + cache.v) / 2**20, peak_MB=peak_mb(device),
                   evict_share=stats.limit_evict_s / stats.decode_s, evictions=stats.limit_evictions,
                   evict_ms=1000 * stats.limit_evict_s / max(stats.limit_evictions, 1),
                   step_ms=1000 * stats.decode_s / stats.new_tokens)
        rows.append(row)
        print(f"{method} limit={limit}: tok/s first {row['first_tok_s']:.1f} last {row['last_tok_s']:.1f} | "
              f"KV {row['kv_MB']:.1f} MB held, {row['kv_alloc_MB']:.1f} MB allocated | eviction "
              f"{100 * row['evict_share']:.1f}% ({row['evictions']} x {row['evict_ms']:.0f} ms)", file=sys.stderr)
    return rows


def limit_markdown(rows) -> str:
    k = rows[0]["speed_tokens"]  # the speeds are measured over min(64, half the tokens decoded)
    lines = [f"| method | limit | tok/s first {k} | tok/s last {k} | last / first | KV MB held | KV MB allocated | "
             "peak MB | eviction % of decode | ms per eviction | ms per token |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['method']} | {r['limit'] or 'none'} | {r['first_tok_s']:.1f} | {r['last_tok_s']:.1f} | "
                     f"{r['last_tok_s'] / r['first_tok_s']:.2f} | {r['kv_MB']:.1f} | {r['kv_alloc_MB']:.1f} | "
                     f"{r['peak_MB']:.0f} | {100 * r['evict_share']:.1f} | {r['evict_ms']:.0f} | {r['step_ms']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Peers: transformers (full cache) and kvpress's SnapKVPress, in this process, on the same prompt ids

def load_peer(ckpt: str, dtype):
    """The same checkpoint as a transformers model (a GGUF through transformers' own reader)."""
    from transformers import AutoModelForCausalLM
    from checkpoint import resolve_checkpoint
    path = resolve_checkpoint(ckpt)
    kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    src = path.parent if path.suffix == ".gguf" else path
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, attn_implementation="sdpa", **kw).eval()


def interleaved(fns: dict, reps: int) -> dict:
    """{name: [result per repetition]}, each repetition running every fn once in turn: a machine
    whose speed drifts (shared cores) slows every system alike, so their ratios stay fair."""
    out = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def end_to_end(times: list[tuple[float, float, float]]) -> dict:
    """Medians of the (prefill s, end-to-end s, decode ms/token) of runs that prefill and decode
    the same number of tokens."""
    pre, tot, dec = zip(*times)
    return dict(prefill_s=statistics.median(pre), end_to_end_s=statistics.median(tot), decode_ms=statistics.median(dec))


def per_token_ms(stamps: list[tuple[float, int]]) -> float:
    """Decode ms/token from (time, tokens so far) at each arrival of new tokens: the tokens after
    the first (which comes from the prefill's logits) over the time they took."""
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    return 1000 * (t1 - t0) / (n1 - n0)


def lqc_run(model, ids: list[int], cfg: lqc.EvictConfig, n_new: int, fused=None):
    """A run_fn for end_to_end: lqc's run from the prompt ids, exactly n_new tokens (no EOS); fused:
    the compiled prefill segments (`Transformer.fuse_prefill`) to prefill with, or None (eager)."""
    def fn():
        stamps = []
        model.fused = fused
        t = time.perf_counter()
        try:
            _, stats = D.run(model, ids, cfg, max_new_tokens=n_new, eos_ids=(),
                             on_token=lambda out: stamps.append((time.perf_counter(), len(out))))
        finally:
            model.fused = None
        return stats.prefill_s + stats.evict_s, time.perf_counter() - t, per_token_ms(stamps)
    return fn


class TokenClock:
    """A transformers streamer that only notes when each new token arrives (`generate` hands it
    the prompt first, then every token)."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append((time.perf_counter(), len(self.stamps)))  # one token a call after the prompt

    def end(self):
        pass


def hf_run(hf, x: torch.Tensor, n_new: int, press=None):
    """A run_fn for end_to_end: a transformers model's prefill (with the press's compression) alone,
    then a whole greedy generate of exactly n_new tokens, timing each new token."""
    def timed_call(fn):
        sync(x.device)
        t = time.perf_counter()
        with press(hf) if press else contextlib.nullcontext():
            fn()
        sync(x.device)
        return time.perf_counter() - t

    def fn():
        clock = TokenClock()
        prefill = timed_call(lambda: hf(x, logits_to_keep=1))
        total = timed_call(lambda: hf.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                               pad_token_id=0, streamer=clock))
        return prefill, total, per_token_ms(clock.stamps[1:])  # stamps[0]: the prompt
    return fn


def peer_rows(model, tok, args, device, dtype) -> list[dict]:
    """lqc (full cache; snapkv at --peer-budget) against transformers (full cache) and kvpress's
    SnapKVPress keeping the same count, end to end: prefill (+ eviction) + --peer-tokens greedy tokens."""
    import kvpress
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hf = load_peer(args.ckpt, dtype).to(device)
    n_new, budget, rows = args.peer_tokens, args.peer_budget, []
    fused = None
    if not args.no_compile:  # lqc's prefill also with its element-wise work compiled (generate.py --compile)
        args.prefill_compile_s = model.fuse_prefill()
        fused, model.fused = model.fused, None
        print(f"prefill segments compiled in {args.prefill_compile_s:.1f} s", file=sys.stderr)
    for n in args.lengths:
        ids = prompt_ids(tok, n)
        x = torch.tensor([ids], device=device)
        snap = kvpress.SnapKVPress(compression_ratio=1 - budget / n, window_size=args.window, kernel_size=7)
        full, snapkv = lqc.EvictConfig(method="full"), lqc.EvictConfig(method="snapkv", budget=budget, window=args.window)
        runs = {"lqc full": lqc_run(model, ids, full, n_new),
                "transformers full": hf_run(hf, x, n_new),
                f"lqc snapkv {budget}": lqc_run(model, ids, snapkv, n_new),
                f"kvpress SnapKVPress {budget}": hf_run(hf, x, n_new, snap)}
        if fused:
            runs["lqc full fused"] = lqc_run(model, ids, full, n_new, fused)
            runs[f"lqc snapkv {budget} fused"] = lqc_run(model, ids, snapkv, n_new, fused)
        for name, fn in runs.items():
            fn()  # warm-up
        for name, times in interleaved(runs, args.reps).items():
            row = dict(length=n, system=name, **end_to_end(times))
            rows.append(row)
            print(f"L={n} {name}: prefill {row['prefill_s']:.2f} s, decode {row['decode_ms']:.1f} ms/token, "
                  f"end to end {row['end_to_end_s']:.2f} s", file=sys.stderr)
    return rows


def peer_markdown(rows, budget) -> str:
    lines = ["| L | system | prefill s | decode ms/token | end to end s | ratio to peer (prefill, decode, e2e) |",
             "|---|---|---|---|---|---|"]
    by = {(r["length"], r["system"]): r for r in rows}
    peer_of = {"lqc full": "transformers full", f"lqc snapkv {budget}": f"kvpress SnapKVPress {budget}",
               "lqc full fused": "transformers full", f"lqc snapkv {budget} fused": f"kvpress SnapKVPress {budget}"}
    for r in rows:
        ratio = ""
        if r["system"] in peer_of:
            p = by[(r["length"], peer_of[r["system"]])]
            ratio = " / ".join(f"{r[k] / p[k]:.2f}" for k in ("prefill_s", "decode_ms", "end_to_end_s"))
        lines.append(f"| {r['length']} | {r['system']} | {r['prefill_s']:.2f} | {r['decode_ms']:.1f} | "
                     f"{r['end_to_end_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = cli.ArgParser(description="Benchmark prefill, eviction overhead and decode speed with compacted caches. "
                                  + cli.WINDOW_RULE + " Bad input ends with one line on stderr and exit code 2.")
    p.add_argument("--ckpt", default="smollm2", help="short name, .gguf file, HF directory or hub id")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8000], help="prompt lengths in tokens")
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256, 512],
                   help="kept entries per KV head per layer")
    p.add_argument("--methods", nargs="+", default=list(EVICT_METHODS), choices=list(lqc.METHODS),
                   help="methods whose eviction time is measured")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--window", type=int, default=32, help="observation window of the methods")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill forward (default: the whole prompt in one causal pass; 512 for padded "
                        "batches and H2O)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled decode step (and, with --peers, the rows with the fused prefill)")
    p.add_argument("--peers", action="store_true",
                   help="also run transformers (full cache) and kvpress SnapKVPress on the same prompts, end to end "
                        "(needs requirements-hf.txt); only the peer table")
    p.add_argument("--peer-tokens", type=int, default=64, help="new tokens per end-to-end peer run")
    p.add_argument("--peer-budget", type=int, default=256, help="entries kept by lqc snapkv and SnapKVPress")
    p.add_argument("--e2e-tokens", type=int, default=64,
                   help="end to end (prefill + evict + this many tokens) for snapkv and each --methods method but H2O, "
                        "the lookahead methods (laq, laqpp) also with reuse of their pseudo tokens; 0: skip")
    p.add_argument("--verify-draft-lens", type=int, nargs="+", default=[], metavar="K",
                   help="with --e2e-tokens: also full-cache decoding and --verify full with these draft lengths")
    p.add_argument("--kv-error", action="store_true",
                   help="instead: the attention error of int8 K/V (--kv-bits 8) at --lengths[0], for three key scales")
    p.add_argument("--cache-limit", type=int, default=None,
                   help="long answers instead: --decode-tokens tokens with the cache growing and bounded by this limit "
                        "(prompt --lengths[0], budget --budgets[0], each --methods); only the limit table")
    p.add_argument("--decode-tokens", type=int, default=2048, help="new tokens per --cache-limit run")
    p.add_argument("--evict-every", type=int, default=EVICT_EVERY, help="with --cache-limit: entries freed per eviction")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    p.add_argument("--out", default="out/bench", help="folder for bench.json and bench.md (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    return p.parse_args(argv)


OUTPUTS = ["bench.json", "bench.md", "peers.json", "peers.md", "limit.json", "limit.md", "kv_error.json", "kv_error.md"]
SHORT = 256  # the full-cache reference prompt of the limit ratio


def check_args(args) -> list[str]:
    """Every flag, before any model work. Returns the notes on what lqc does with the window."""
    cli.positive("--lengths", *args.lengths)
    cli.positive("--budgets", *args.budgets)
    for flag in ("lengths", "budgets", "methods"):
        cli.distinct(f"--{flag}", getattr(args, flag))
    for flag in ("reps", "steps", "peer_tokens"):
        cli.at_least(cli.flag_name(flag), getattr(args, flag), 1)
    cli.positive("--prefill-chunk", args.prefill_chunk)
    cli.at_least("--warmup", args.warmup, 0)
    cli.at_least("--e2e-tokens", args.e2e_tokens, 0)
    cli.positive("--verify-draft-lens", *args.verify_draft_lens)
    cli.distinct("--verify-draft-lens", args.verify_draft_lens)
    if args.verify_draft_lens and not args.e2e_tokens:
        raise BadInput("--verify-draft-lens needs --e2e-tokens > 0 (verify mode is timed end to end)")
    if args.peers and args.cache_limit is not None:
        raise BadInput("--peers and --cache-limit are two separate runs (peer table, limit table): pass one of them")
    if args.peers:
        check_peers(args)
    if args.cache_limit is not None:
        cli.at_least("--decode-tokens", args.decode_tokens, 2)
        for m in args.methods:
            check_limit(lqc.EvictConfig(method=m, budget=args.budgets[0]), args.cache_limit, args.evict_every, None)
    notes = []
    cli.check_grid(args.methods, args.budgets, notes, window=args.window)
    return notes


def check_peers(args):
    if not 0 < args.peer_budget < min(args.lengths):
        raise BadInput(f"--peer-budget must be > 0 and below every --lengths (got {args.peer_budget})")
    missing = [m for m in ("transformers", "kvpress") if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(f"--peers needs {' and '.join(missing)}: pip install -r requirements-hf.txt")


def new_tokens(args) -> tuple[int, str]:
    """The most tokens a run decodes after its prompt, and the flags that set that number."""
    if args.peers:
        return args.peer_tokens, "--peer-tokens"
    if args.cache_limit is not None:
        return args.decode_tokens, "--decode-tokens"
    return max(args.steps + args.warmup, args.e2e_tokens), "--steps + --warmup or --e2e-tokens"


def check_lengths(args, tok, context: int, notes: list):
    """After loading the tokenizer: every prompt can be built at its length and decoded within the context."""
    shortest = len(tok.encode(QUESTION)) + 1
    if min(args.lengths) < shortest:
        raise BadInput(f"--lengths must be >= {shortest}, the question and one token of filler (got {min(args.lengths)})")
    new, flags = new_tokens(args)
    longest = max(*args.lengths, SHORT) + new
    if longest > context:
        raise BadInput(f"--lengths up to {max(args.lengths, default=0)} + {flags} ({longest} tokens) exceed the "
                       f"model's context of {context}")
    if args.peers:  # the peers evict to --peer-budget, below every length (check_peers)
        return
    if args.cache_limit is not None:  # the limit run: --budgets[0] at --lengths[0], decoding within the limit
        cli.budget_note(args.methods[0], args.budgets[0], args.lengths[0], notes, cache_limit=args.cache_limit,
                        max_new_tokens=args.decode_tokens)
        return
    cli.budgets_note(args.budgets, args.lengths, notes)


def write_table(out: Path, args, name: str, rows: list[dict], markdown_fn) -> list[dict]:
    """<out>/<name>.json and <name>.md, the table on stdout."""
    cli.write_json(out / f"{name}.json", {"args": vars(args), "torch": torch.__version__, "rows": rows})
    table = markdown_fn(rows)
    cli.write_text(out / f"{name}.md", table + "\n")
    cli.write_stdout(table + "\n")
    return rows


def write_results(out: Path, result: dict, complete: bool):
    cli.write_json(out / "bench.json", {**result, "complete": complete})


def main(args):
    notes = check_args(args)
    device, dtype = cli.check_device(args.device, args.dtype)
    out = cli.check_out(args.out, args.overwrite)
    model, tok = load(args.ckpt, device, dtype)
    args.loaded = model.source  # recorded in bench.json: --ckpt llama may have fallen back to SmolLM2
    check_lengths(args, tok, model.args.max_seq_len, notes)
    for line in notes:
        cli.note("bench.py", line)
    cli.start_out(out, OUTPUTS)
    if args.kv_error:
        return write_table(out, args, "kv_error", kv_error_rows(model, tok, args, device), kv_error_markdown)
    if args.cache_limit is not None:
        return write_table(out, args, "limit", limit_rows(model, tok, args, device), limit_markdown)
    if args.peers:
        return write_table(out, args, "peers", peer_rows(model, tok, args, device, dtype),
                           lambda rows: peer_markdown(rows, args.peer_budget))
    steps = {"eager": (make_step(model, compile=False), False)}
    if not args.no_compile:
        flex = flex_available(device)
        steps["compiled"] = (make_step(model, compile=True), flex)
    torch._dynamo.config.cache_size_limit = 64  # one graph per cache capacity
    args.limits = machine_limits(device, dtype)
    print(f"machine: torch.mm {args.limits['matmul_gflop_s']:.0f} GFLOP/s, copy {args.limits['copy_gb_s']:.1f} GB/s",
          file=sys.stderr)
    result = {"args": vars(args), "device": str(device), "torch": torch.__version__, "rows": [], "end_to_end": []}
    ref = limit_reference(model, tok, device)
    for n in args.lengths:
        result["rows"] += bench_length(model, tok, n, args, steps, device, ref if n == max(args.lengths) else None)
        if args.e2e_tokens > 0:
            result["end_to_end"] += bench_end_to_end(model, tok, n, args, device)
        write_results(out, result, complete=False)  # an interrupted run keeps the lengths it finished
    rows, e2e = result["rows"], result["end_to_end"]
    # the limit: a long prompt evicted to 256 entries vs a 256-token prompt with the full cache
    at = [r for r in rows if r["length"] == max(args.lengths) and r["budget"] == 256]
    lines = [markdown(rows, args), "", *[format_e2e(r, args) for r in e2e]]  # a blank line ends the table
    for name in steps:
        key = f"decode_{name}_tok_s"
        if at:
            short = at[0][f"ref_{key}"]
            result[f"limit_ratio_{name}"] = at[0][key] / short
            lines.append(f"limit ratio ({name}): {at[0][key]:.1f} tok/s at L={max(args.lengths)}, budget 256 vs "
                         f"{short:.1f} tok/s at L={SHORT}, full cache, measured in turn -> "
                         f"{result[f'limit_ratio_{name}']:.2f}")
    if "compiled" in steps:
        ratios = [r["decode_compiled_tok_s"] / r["decode_eager_tok_s"] for r in rows]
        lines.append(f"compiled / eager decode speed: median {statistics.median(ratios):.2f} "
                     f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    cli.write_text(out / "bench.md", "\n".join(lines) + "\n")
    write_results(out, result, complete=True)
    cli.write_stdout("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    cli.exit_on_bad_input("bench.py", main, parse_args())
