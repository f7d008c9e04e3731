"""serve.py: continuous batching in a fixed KV memory. Every request's greedy answer equals the
request run alone; the KV bytes stay within --kv-memory; bad lines get error records; a rerun skips
what is answered."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import cli
import decoding as D
import lqc
import model as M
import serve as S
from steps import model_step, to_static
from tiny_models import rand_ids, save_hf_dir, tiny

STUB_TOK = SimpleNamespace(eos_ids=(), decode=lambda ids: " ".join(map(str, ids)))
METHODS = lqc.method_names()


def requests_for(model, cfgs, lengths, arrivals, max_new):
    return [S.Request(i, i + 1, rand_ids(model, n, 100 + i)[0].tolist(), cfg, m, a)
            for i, (cfg, n, a, m) in enumerate(zip(cfgs, lengths, arrivals, max_new))]


def serve_all(model, requests, *, n_slots, capacity, **kw):
    records = []
    server = S.Server(model, STUB_TOK, n_slots=n_slots, capacity=capacity, prefill_chunk=7, **kw)
    server.run(requests, records.append)
    return {r["id"]: r for r in records}, server


@pytest.mark.parametrize("method", METHODS)
def test_every_request_equals_the_request_alone(method):
    """Three slots, seven requests of different lengths, budgets and answer lengths; some arrive
    while others decode (arrival 0), one after an idle gap: each answer equals `decoding.run` on the
    request alone (greedy, no draft reuse), token for token."""
    model = tiny(4, 2, n_layers=2)
    lengths, budgets = [30, 9, 45, 20, 33, 12, 40], [8, 16, 12, 8, 20, 8, 10]
    cfgs = [lqc.EvictConfig(method=method, budget=b, window=4, window_laqpp=2, lookahead=3) for b in budgets]
    max_new = [20, 16, 14, 3, 9, 12, 7]
    requests = requests_for(model, cfgs, lengths, [0, 0, 0, 0, 0, 50.0, 50.0], max_new)
    capacity = max(r.holds(model.args.n_layers) for r in requests)
    out, server = serve_all(model, requests, n_slots=3, capacity=capacity)
    assert server.peak == 3 and len(out) == len(requests)
    for r in requests:
        # a slot is sized for what each method keeps (PyramidKV: its widest layer), except Ada-KV,
        # whose heads a slot cuts to what it holds besides the answer (its widest head depends on
        # the prompt)
        cfg = replace(r.cfg, cap=max(capacity - r.max_new_tokens, r.cfg.budget)) if method == "adakv" else r.cfg
        alone, _ = D.run(model, r.ids, cfg, max_new_tokens=r.max_new_tokens, reuse=False)
        assert out[r.id]["token_ids"] == alone, f"request {r.id}"
        assert out[r.id]["new_tokens"] == r.max_new_tokens and len(out[r.id]["itl_ms"]) == r.max_new_tokens - 1


@pytest.mark.parametrize("method", list(lqc.METHODS))
def test_under_a_cache_limit_every_request_equals_the_request_alone(method):
    """--cache-limit: slots of `limit` entries, each evicting on its own while decoding. Requests
    with budgets below and above the limit and answers long enough to evict several times, some
    admitted into slots other requests left (with their queries or H2O mass still in the
    evictor's state): each answer equals `decoding.run` alone with the same limit, token for token."""
    model = tiny(4, 2, n_layers=2)
    limit, every = 14, 4
    lengths, budgets = [30, 3, 45, 20, 33, 12], [8, 20, 12, 8, 10, 16]  # 3: a prompt shorter than the window
    cfgs = [lqc.EvictConfig(method=method, budget=b, window=4, window_laqpp=2, lookahead=3) for b in budgets]
    max_new = [24, 16, 30, 5, 22, 18]
    requests = requests_for(model, cfgs, lengths, [0, 0, 0, 0, 40.0, 40.0], max_new)
    rule = replace(cfgs[0], budget=limit)
    out, server = serve_all(model, requests, n_slots=2, capacity=limit, limit_cfg=rule, evict_every=every)
    assert server.peak == 2 and len(out) == len(requests) and server.evictor.evictions > 0
    assert server.cache.capacity == limit  # what a slot holds, every layer and head
    for r in requests:
        alone, stats = D.run(model, r.ids, r.cfg, max_new_tokens=r.max_new_tokens, reuse=False, cache_limit=limit,
                             evict_every=every)
        assert out[r.id]["token_ids"] == alone, f"request {r.id}"
        assert out[r.id]["budget"] == min(r.cfg.budget, limit)  # what the prompt kept, not what was asked
    assert stats.limit_evictions > 0  # the last request evicted while decoding alone too


def test_under_a_cache_limit_a_request_with_another_rule_is_refused():
    model = tiny(4, 2, n_layers=2)
    rule = lqc.EvictConfig(method="snapkv", budget=14, window=4)
    server = S.Server(model, STUB_TOK, n_slots=1, capacity=14, limit_cfg=rule)
    same, other, narrow = [S.Request(i, i, [1] * 40, cfg, 50) for i, cfg in enumerate(
        [replace(rule, budget=64), replace(rule, method="h2o"), replace(rule, budget=2, window=2)])]
    assert server.fits(same) is None  # a budget above the limit, an answer longer than the slot: it evicts
    assert "one rule" in server.fits(other) and "one rule" in server.fits(narrow)


def test_static_batches_admit_a_batch_only_when_the_last_one_is_done():
    model = tiny(4, 2, n_layers=2)
    cfg = lqc.EvictConfig(method="snapkv", budget=8, window=4)
    requests = requests_for(model, [cfg] * 5, [20, 30, 12, 25, 18], [0.0] * 5, [5, 8, 3, 6, 4])
    ref, _ = serve_all(model, requests, n_slots=2, capacity=16)
    static, _ = serve_all(model, requests, n_slots=2, capacity=16, static=True)
    assert len(static) == len(ref) == 5
    assert {k: r["token_ids"] for k, r in static.items()} == {k: r["token_ids"] for k, r in ref.items()}
    batches = [[0, 1], [2, 3], [4]]  # in arrival order, two slots at a time
    for done, then in zip(batches, batches[1:]):
        assert max(static[i]["latency_s"] for i in done) <= min(static[i]["ttft_s"] for i in then)
    # continuous batching admits request 2 as soon as request 0 (3 tokens fewer than 1) is done
    assert ref[2]["ttft_s"] < ref[1]["latency_s"]


def test_compiled_step_runs_requests_coming_and_going_without_recompiling():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny(4, 2, n_layers=2)
    cfg = lqc.EvictConfig(method="snapkv", budget=8, window=4)
    requests = requests_for(model, [cfg] * 5, [20, 30, 12, 25, 18], [0.0] * 5, [5, 8, 3, 6, 4])
    ref, _ = serve_all(model, requests, n_slots=2, capacity=16)
    graphs = []
    server = S.Server(model, STUB_TOK, n_slots=2, capacity=16, prefill_chunk=7, compile=True)
    inner = server.step
    server.step = lambda *a: (inner(*a), graphs.append(counters["stats"]["unique_graphs"]))[0]
    out = []
    server.run(requests, out.append)
    assert {r["id"]: r["token_ids"] for r in out} == {k: r["token_ids"] for k, r in ref.items()}
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs


def test_slots_fit_the_kv_memory_and_the_cache_never_grows():
    """The slots' allocated bytes (K, V, positions, lengths) stay within --kv-memory; 500 short
    requests run through 3 slots with the cache's buffers never reallocated and no tensors left behind."""
    model = tiny(4, 2, n_layers=2)
    cfg = lqc.EvictConfig(method="streaming", budget=6)
    requests = requests_for(model, [cfg] * 500, [4 + i % 9 for i in range(500)], [0.0] * 500, [1 + i % 4 for i in range(500)])
    memory = 3 * S.slot_bytes(model, 10) + S.slot_bytes(model, 10) - 1  # 3 slots and most of a fourth
    n_slots, capacity = S.plan_slots(model, requests, memory, cfg, max_new_tokens=4)
    assert (n_slots, capacity) == (3, 10)
    server = S.Server(model, STUB_TOK, n_slots=n_slots, capacity=capacity)
    allocated = sum(b.untyped_storage().nbytes() for b in server.cache.buffers())
    assert allocated <= memory and allocated == n_slots * S.slot_bytes(model, capacity)
    ptrs = [b.data_ptr() for b in server.cache.buffers()]
    counts, done = [], []

    def on_done(rec):
        done.append(rec)
        if len(done) in (100, 500):
            gc.collect()
            counts.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
    server.run(requests, on_done)
    assert len(done) == 500 and [b.data_ptr() for b in server.cache.buffers()] == ptrs
    assert counts[1] <= counts[0], counts


def test_request_that_does_not_fit_is_refused_not_truncated():
    model = tiny(4, 2, n_layers=2)
    server = S.Server(model, STUB_TOK, n_slots=2, capacity=20)
    full = S.Request("a", 1, list(range(30)), lqc.EvictConfig(method="full"), 4)
    evicted = S.Request("b", 2, list(range(30)), lqc.EvictConfig(method="snapkv", budget=12, window=4), 4)
    assert "slot holds 20" in server.fits(full) and server.fits(evicted) is None
    long = S.Request("c", 3, list(range(model.args.max_seq_len)), lqc.EvictConfig(method="snapkv", budget=8), 4)
    assert "context" in server.fits(long)


def test_request_fields_above_the_flags_and_a_too_long_full_request():
    """A slot is sized by the flags: a request asking for more than it holds gets a record that says
    which numbers to change; with the full cache, a request longer than the context is refused and
    does not size (or empty) the slots of the others."""
    model = tiny(4, 2, n_layers=2)
    snap = lqc.EvictConfig(method="snapkv", budget=8, window=4)
    big = S.Request("a", 1, list(range(30)), replace(snap, budget=20), 4)
    server = S.Server(model, STUB_TOK, n_slots=2, capacity=8 + 4)
    assert "lower the request's budget or max_new_tokens" in server.fits(big)
    ctx = model.args.max_seq_len
    full = lqc.EvictConfig(method="full")
    reqs = [S.Request("ok", 1, list(range(20)), full, 4), S.Request("long", 2, list(range(ctx)), full, 4)]
    fit = [r for r in reqs if len(r.ids) + r.max_new_tokens <= ctx]
    slots, capacity = S.plan_slots(model, fit, S.slot_bytes(model, 24) * 3, full, 4)
    assert (slots, capacity) == (3, 24)


@pytest.mark.parametrize("text,expected", [("64MB", 64 * 10**6), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 2**20),
                                           ("1000", 1000)])
def test_parse_size(text, expected):
    assert S.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "1.5XB", "-3MB", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(S.BadInput, match="give a size"):
        S.parse_size(text)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return str(save_hf_dir(tiny(), tmp_path_factory.mktemp("serve") / "tiny"))


def run_serve(*args):
    return subprocess.run([sys.executable, "serve.py", *args], capture_output=True, text=True, timeout=300)


def test_cli_answers_refuses_bad_lines_and_resumes(tiny_ckpt, tmp_path):
    reqs = tmp_path / "r.jsonl"
    lines = [{"id": "a", "prompt": "the cat sat on the mat " * 8},
             {"id": "b", "prompt": "a dog ran " * 5, "max_new_tokens": 3, "arrival": 0.2},
             "not json",
             {"id": "c", "messages": [{"role": "user", "content": "hi there"}], "method": "snapkv", "budget": 8},
             {"id": "d", "prompt": "x", "budget": 0},
             {"id": "e", "prompt": "long " * 900},
             {"id": "f", "messages": [{"role": "assistant", "content": "no"}]},
             {"prompt": "no id"},
             {"id": "g", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
             {"id": "h", "prompt": "a \ud800 b"},
             {"id": "i", "prompt": "x", "arrival": 10**400}]
    reqs.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "a.jsonl"
    r = run_serve("--ckpt", tiny_ckpt, "--requests", str(reqs), "--out", str(out), "--kv-memory", "1MB",
                  "--budget", "16", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    by_line = {rec["line"]: rec for rec in recs}
    assert sorted(by_line) == list(range(1, 12))
    assert {n for n, rec in by_line.items() if "text" in rec} == {1, 2, 4}
    assert by_line[2]["new_tokens"] <= 3 and by_line[4]["method"] == "snapkv"
    assert "not JSON" in by_line[3]["error"] and "'budget' must be an integer >= 1" in by_line[5]["error"]
    assert "context" in by_line[6]["error"] and "one user message" in by_line[7]["error"]
    assert "'id'" in by_line[8]["error"] and "needs the checkpoint's chat format" in by_line[9]["error"]
    assert "not valid Unicode" in by_line[10]["error"] and "'arrival' (seconds) must be a number" in by_line[11]["error"]
    # a rerun into the same --out serves nothing again; a cut last line (a kill) is dropped and redone
    out.write_text(out.read_text()[:-20])
    r = run_serve("--ckpt", tiny_ckpt, "--requests", str(reqs), "--out", str(out), "--kv-memory", "1MB",
                  "--budget", "16", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    again = [json.loads(x) for x in out.read_text().splitlines()]
    # answered lines are skipped; refused ones are tried again (and refused again)
    assert {rec["line"] for rec in again} == set(range(1, 12))
    assert sum("text" in rec for rec in again) == 3


def test_bench_runs_its_rows_and_writes_the_table(tiny_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    r = run_serve("--ckpt", tiny_ckpt, "--bench", "--length", "300", "--requests-n", "2", "--rates", "inf",
                  "--rows", "full", "snapkv:16+int8", "--max-new-tokens", "3", "--kv-memory", "1MB", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [x["row"] for x in rows] == ["full", "snapkv 16 int8"] and all(x["served"] == 2 for x in rows)
    assert "| inf | snapkv 16 int8 |" in r.stdout


REQ = ["--requests", "/nonexistent.jsonl", "--out", "o.jsonl"]  # the flags are checked before the file is read


@pytest.mark.parametrize("args,message", [
    ([], "give --requests"),
    (["--requests", "x.jsonl"], "needs --out"),
    (["--bench", "--requests", "x.jsonl", "--out", "o"], "give --requests"),
    (["--requests", "/nonexistent.jsonl", "--out", "o.jsonl"], "cannot read"),
    (["--kv-memory", "lots", "--bench"], "give a size"),
    (["--kv-memory", "10KB", "--bench", "--length", "64"], "holds no slot"),
    (["--bench", "--rows", "laqpp"], "--rows"),
    (["--bench", "--rates", "0"], "--rates"),
    (["--max-new-tokens", "0", "--bench"], "--max-new-tokens"),
    (["--bench", "--cache-limit", "64"], "--cache-limit applies to --requests"),
    ([*REQ, "--method", "full", "--cache-limit", "64"], "--cache-limit needs an evicting method"),
    ([*REQ, "--cache-limit", "64", "--evict-every", "64"], "--evict-every < --cache-limit"),
    ([*REQ, "--cache-limit", "64", "--kv-bits", "8"], "do not go together"),
    ([*REQ, "--cache-limit", "0"], "--cache-limit must be > 0"),
    (["--bench", "--evict-every", "0"], "--evict-every must be > 0"),
])
def test_cli_bad_input_is_one_line(tiny_ckpt, args, message, capsys):
    """In this process, under the exit wrapper as `python serve.py` runs (the real process's exit code
    is checked by the tests above)."""
    with pytest.raises(SystemExit) as e:
        cli.exit_on_bad_input("serve.py", lambda: S.main(S.parse_args(["--ckpt", tiny_ckpt, *args])))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == "", err


# ----------------------------------------------------------------------------------------------
# int8 entries (--kv-bits 8)

def test_int8_entries_bound_the_attention_error_and_take_a_quarter_of_the_bytes():
    """One decode step over int8 entries vs the same entries in float32: the logits stay within 2%
    (relative L2) on prompts whose keys have an outlier channel (x50, as Qwen2.5's do); a KV head's
    entry takes 2 * (D + 4) + 8 bytes instead of 2 * 4 * D + 8."""
    model = tiny(4, 2, n_layers=2)
    ids = rand_ids(model, 40, 1)
    pre = D.prefill(model, ids)
    for l in range(len(pre.cache.k)):  # an outlier channel in every head's keys
        pre.cache.k[l][..., 3] *= 50
    token, pos = torch.tensor([[5]]), torch.tensor([[40]])
    out = {}
    for bits in (None, 8):
        cache = to_static(model, pre.cache, 4, flex=False, kv_bits=bits)
        out[bits] = model_step(model)(token, pos, cache)[0]
        a = model.args
        per_entry = 2 * (a.head_dim + 4) + 8 if bits else 2 * 4 * a.head_dim + 8
        assert sum(t.untyped_storage().nbytes() for t in cache.k + cache.v + cache.pos) == \
            a.n_layers * a.n_kv_heads * cache.capacity * per_entry
    err = ((out[8] - out[None]).norm() / out[None].norm()).item()
    assert 0 < err < 0.02, err


def test_int8_keys_keep_the_small_channels_beside_an_outlier():
    """Per channel, then per token: a channel 100x larger than the others does not wash them out (a
    per-token scale alone would round them to a few codes)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 30, 16, generator=g)
    k[..., 0] *= 100
    pos = torch.arange(30).expand(1, 2, 30)
    c = M.channel_scale(k, pos)
    back = M.dequantize(M.quantize(k / c), torch.float32) * c
    small = (back - k)[..., 1:].norm() / k[..., 1:].norm()
    naive = (M.dequantize(M.quantize(k), torch.float32) - k)[..., 1:].norm() / k[..., 1:].norm()
    assert small < 0.01 and naive > 5 * small, (small, naive)


@pytest.mark.parametrize("method", ["full", "snapkv", "laqpp"])
def test_int8_slots_answer_as_the_request_alone_with_int8(method):
    model = tiny(4, 2, n_layers=2)
    cfgs = [lqc.EvictConfig(method=method, budget=b, window=4, window_laqpp=2, lookahead=3) for b in (8, 12, 10)]
    requests = requests_for(model, cfgs, [30, 25, 40], [0.0] * 3, [12, 9, 6])
    capacity = max(r.holds(model.args.n_layers) for r in requests)
    records = []
    server = S.Server(model, STUB_TOK, n_slots=2, capacity=capacity, prefill_chunk=7, kv_bits=8)
    server.run(requests, records.append)
    for r, rec in zip(requests, sorted(records, key=lambda x: x["id"])):
        alone, _ = D.run(model, r.ids, r.cfg, max_new_tokens=r.max_new_tokens, reuse=False, kv_bits=8)
        assert rec["token_ids"] == alone


def test_int8_fits_at_least_3_5x_the_slots_of_float32():
    model = tiny(4, 2, n_layers=2)
    for head_dim in (64, 128):  # SmolLM2 and Qwen2.5-0.5B: 64; Llama 3: 128
        fake = SimpleNamespace(args=replace(model.args, head_dim=head_dim), tok_embeddings=model.tok_embeddings)
        ratio = S.slot_bytes(fake, 576) / S.slot_bytes(fake, 576, kv_bits=8)
        assert ratio >= 3.5, (head_dim, ratio)


def test_a_killed_run_leaves_whole_lines_and_a_rerun_finishes_it(tiny_ckpt, tmp_path):
    """kill -9 after the first answers: --out holds only whole JSON lines (each written with one
    call); the rerun serves the rest and no request twice."""
    import os
    import signal
    import time
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("".join(json.dumps({"id": i, "prompt": "the cat sat on the mat " * (3 + i % 10)}) + "\n"
                            for i in range(60)))
    out = tmp_path / "a.jsonl"
    args = [sys.executable, "serve.py", "--ckpt", tiny_ckpt, "--requests", str(reqs), "--out", str(out),
            "--kv-memory", "500KB", "--budget", "16", "--max-new-tokens", "200"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    first = [json.loads(x) for x in out.read_text().splitlines()]  # every line whole
    assert 2 <= len(first) < 60
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert all("text" in rec for rec in recs), [rec for rec in recs if "text" not in rec][:1]
    assert sorted(rec["line"] for rec in recs) == list(range(1, 61))  # each request answered once
