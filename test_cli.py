"""The command lines as a user meets them: a corpus of bad input (hostile flags, odd files, bad data
lines, occupied output folders, bad stdin), each ending with its exit code, exactly one line on
stderr and no traceback; valid edge inputs that must work; Unix-tool behaviour (closed stdin and
stdout, a full disk, Ctrl-C) on real processes.

Most cases run in process through parse_args + main + the exit wrapper (a process costs 2-3 s of
torch import); only what needs a real process (signals, file descriptors) gets one.
"""
from __future__ import annotations

import errno
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench as B
import cli
import eval as E
import decoding as D
import generate as G
from test_lqc import ROOT, TEXT, save_hf_dir, tiny

SCRIPTS = {"generate.py": G, "eval.py": E, "bench.py": B}
CKPT = "<ckpt>"  # replaced by the tiny checkpoint's folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_hf_dir(tiny(), tmp_path_factory.mktemp("cli") / "tiny"))


@pytest.fixture
def files(tmp_path):
    """Odd files a user may point lqc at, by name."""
    lines = {
        "ok": {"context": TEXT, "input": "Who jumps?", "answers": ["the fox"]},
        "array": [1, 2],
        "no_context": {"input": "q", "answers": ["a"]},
        "num_context": {"context": 7, "answers": ["a"]},
        "empty_answers": {"context": TEXT, "answers": []},
        "num_answer": {"context": TEXT, "answers": ["a", 3]},
        "str_answers": {"context": TEXT, "answers": "the fox"},
        "blank_answer": {"context": TEXT, "answers": ["  "]},
        "num_input": {"context": TEXT, "input": 5, "answers": ["a"]},
    }
    ok = json.dumps(lines["ok"])
    for name, obj in lines.items():  # the bad line is line 3, after a good line and a blank one
        (tmp_path / f"{name}.jsonl").write_text(f"{ok}\n\n{json.dumps(obj)}\n")
    (tmp_path / "not_json.jsonl").write_text(f"{ok}\n{{'context': 'single quotes'}}\n")
    (tmp_path / "not_utf8.jsonl").write_bytes(ok.encode() + b"\n\n" + b'{"context": "caf\xe9"}\n')
    (tmp_path / "surrogate.jsonl").write_text('{"context": "a \\udc80 b", "answers": ["x"]}\n')
    (tmp_path / "deep.jsonl").write_text(f"{ok}\n" + "[" * 100000 + "]" * 100000 + "\n")
    (tmp_path / "huge_int.jsonl").write_text(f"{ok}\n" + '{"context": "x", "answers": ["a"], "n": ' + "9" * 5000 + "}\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "prompt_latin1.txt").write_bytes("quick zebras caf\xe9".encode("latin-1"))
    (tmp_path / "prompt_empty.txt").write_text("\n\n")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "results.md").write_text("an earlier run\n")
    (tmp_path / "a_file").write_text("x")
    return tmp_path


def run_main(script: str, argv: list[str], ckpt: str, files: Path, capsys, model_work_allowed=True):
    """parse_args + main under the exit wrapper, in this process -> (exit code, stdout, stderr).
    `model_work_allowed=False`: loading a checkpoint fails the test (the error must come first)."""
    mod = SCRIPTS[script]
    argv = [a.replace(CKPT, ckpt).replace("<files>", str(files)) for a in argv]
    if "--ckpt" not in argv:
        argv = ["--ckpt", ckpt, *argv]
    if script == "generate.py" and not {"--prompt", "--prompt-file", "--demo"} & set(argv):
        argv += ["--prompt", "quick zebras jump"]
    if script != "generate.py" and "--out" not in argv:
        argv += ["--out", str(files / "out")]
    real_load = mod.load
    mod.load = real_load if model_work_allowed else lambda *a, **k: pytest.fail("model work before the error")
    try:
        if script == "generate.py":
            cli.exit_on_bad_input(script, lambda: mod.main(**vars(mod.parse_args(argv))))
        else:
            cli.exit_on_bad_input(script, lambda: mod.main(mod.parse_args(argv)))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        mod.load = real_load
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code, out, err, expected_code, message):
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and message in lines[0], (code, err)
    assert "Traceback" not in err and out == ""


# ----------------------------------------------------------------------------------------------
# The corpus: (script, argv, what the one stderr line says); all before any model work

SURROGATE = b"quick \xff zebras".decode("utf-8", "surrogateescape")  # how Python hands over a non-UTF-8 argv
BEFORE_MODEL = [
    # generate.py: ranges and sampling
    ("generate.py", ["--budget", "0"], "--budget must be > 0"),
    # generate.py: speculative decoding and the cache limit
    ("generate.py", ["--draft-len", "0"], "--draft-len must be > 0"),
    ("generate.py", ["--method", "full", "--cache-limit", "64"], "--cache-limit needs an evicting method"),
    ("generate.py", ["--method", "snapkv", "--cache-limit", "64", "--evict-every", "64"], "--evict-every < --cache-limit"),
    ("generate.py", ["--method", "snapkv", "--cache-limit", "64", "--verify", "full"], "do not go together"),
    ("generate.py", ["--method", "laq", "--budget", "8", "--window", "4", "--cache-limit", "9", "--evict-every", "2"],
     "--cache-limit 9 must exceed the 9 pseudo tokens"),
    ("generate.py", ["--method", "snapkv", "--cache-limit", "4", "--evict-every", "2", "--verify", "full"],
     "do not go together"),
    # eval.py and bench.py: the long-answer task and verify rows
    ("eval.py", ["--tasks", "listing", "passkey"], "--tasks listing runs alone"),
    ("eval.py", ["--tasks", "listing", "--budgets", "64", "--evict-every", "64"], "--evict-every must be below"),
    ("eval.py", ["--answer-tokens", "0"], "--answer-tokens must be >= 1"),
    ("bench.py", ["--verify-draft-lens", "0"], "--verify-draft-lens must be > 0"),
    ("bench.py", ["--verify-draft-lens", "2", "2"], "--verify-draft-lens lists a value twice"),
    ("bench.py", ["--verify-draft-lens", "2", "--e2e-tokens", "0"], "--verify-draft-lens needs --e2e-tokens > 0"),
    ("generate.py", ["--budget", "-5"], "--budget must be > 0"),
    ("generate.py", ["--window", "0"], "--window must be >= 1"),
    ("generate.py", ["--window-laqpp", "0"], "--window-laqpp must be >= 1"),
    ("generate.py", ["--lookahead", "0"], "--lookahead must be >= 1"),
    ("generate.py", ["--pool-kernel", "4"], "--pool-kernel must be odd"),
    ("generate.py", ["--pool-kernel", "0"], "--pool-kernel must be odd"),
    ("generate.py", ["--pool-kernel", "1001"], "from 1 to 255"),
    ("generate.py", ["--temperature", "nan"], "--temperature must be 0 (greedy) or a finite number"),
    ("generate.py", ["--temperature", "inf"], "--temperature"),
    ("generate.py", ["--temperature", "-1"], "--temperature"),
    ("generate.py", ["--temperature", "1e-320"], "--temperature"),  # a denormal
    ("generate.py", ["--top-p", "nan"], "--top-p must be in (0, 1]"),
    ("generate.py", ["--top-p", "0"], "--top-p"),
    ("generate.py", ["--top-p", "1.5"], "--top-p"),
    ("generate.py", ["--top-k", "-1"], "--top-k must be >= 0"),
    ("generate.py", ["--seed", str(2**64)], "--seed must be between"),
    ("generate.py", ["--seed", str(-2**63 - 1)], "--seed must be between"),
    ("generate.py", ["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    ("generate.py", ["--max-new-tokens", "-3"], "--max-new-tokens must be > 0"),
    ("generate.py", ["--prefill-chunk", "0"], "--prefill-chunk must be > 0"),
    # generate.py: the prompt
    ("generate.py", ["--prompt", "   "], "the prompt is empty"),
    ("generate.py", ["--prompt", SURROGATE], "--prompt is not UTF-8: byte 0xff at byte position 6"),
    ("generate.py", ["--answer-prefix", SURROGATE], "--answer-prefix is not UTF-8"),
    ("generate.py", ["--prompt-file", "/nonexistent.txt"], "cannot read --prompt-file"),
    ("generate.py", ["--prompt-file", "<files>/a_dir"], "cannot read --prompt-file: Is a directory"),
    ("generate.py", ["--prompt-file", "<files>/prompt_latin1.txt"], "is not UTF-8: byte 0xe9 at byte position 16"),
    ("generate.py", ["--prompt-file", "<files>/prompt_empty.txt"], "the prompt is empty"),
    ("generate.py", ["--prompt-file", "/dev/zero"], "larger than 64 MiB"),
    # generate.py: device, argparse
    ("generate.py", ["--device", "toaster"], "unknown device"),
    ("generate.py", ["--device", "meta"], "cannot run lqc"),
    ("generate.py", ["--method", "magic"], "invalid choice"),
    ("generate.py", ["--dtype", "float8"], "invalid choice"),
    ("generate.py", ["--budget", "x"], "invalid int"),
    ("generate.py", ["--temperature", "warm"], "invalid float"),
    ("generate.py", ["--prompt", "a", "--prompt-file", "b"], "not allowed with argument"),
    ("generate.py", ["--frobnicate"], "unrecognized arguments"),
    # eval.py: --data lines, with the real line number
    ("eval.py", ["--data", "<files>/not_json.jsonl"], "line 2 is not JSON"),
    ("eval.py", ["--data", "<files>/array.jsonl"], "line 3 is not a JSON object"),
    ("eval.py", ["--data", "<files>/no_context.jsonl"], "line 3: 'context' must be a non-empty string"),
    ("eval.py", ["--data", "<files>/num_context.jsonl"], "line 3: 'context'"),
    ("eval.py", ["--data", "<files>/empty_answers.jsonl"], "line 3: 'answers' must be a non-empty list"),
    ("eval.py", ["--data", "<files>/num_answer.jsonl"], "line 3: 'answers'"),
    ("eval.py", ["--data", "<files>/str_answers.jsonl"], "line 3: 'answers'"),
    ("eval.py", ["--data", "<files>/blank_answer.jsonl"], "line 3: 'answers'"),
    ("eval.py", ["--data", "<files>/num_input.jsonl"], "line 3: 'input' must be a string"),
    ("eval.py", ["--data", "<files>/not_utf8.jsonl"], "line 3 is not UTF-8: byte 0xe9 at byte position 16"),
    ("eval.py", ["--data", "<files>/surrogate.jsonl"], "line 1: 'context' is not valid Unicode"),
    ("eval.py", ["--data", "<files>/deep.jsonl"], "line 2 nests too deeply"),
    ("eval.py", ["--data", "<files>/huge_int.jsonl"], "line 2 cannot be read"),
    ("eval.py", ["--data", "<files>/empty.jsonl"], "holds no examples"),
    ("eval.py", ["--data", "<files>/blank.jsonl"], "holds no examples"),
    ("eval.py", ["--data", "/nonexistent.jsonl"], "cannot read --data"),
    ("eval.py", ["--data", "<files>/a_dir"], "cannot read --data: Is a directory"),
    # eval.py: flags and --out
    ("eval.py", ["--seeds", "0"], "--seeds must be >= 1"),
    ("eval.py", ["--data", "<files>/ok.jsonl", "--limit", "0"], "--limit must be >= 1"),
    ("eval.py", ["--limit", "3"], "--limit applies to --data only"),
    ("eval.py", ["--data", "<files>/ok.jsonl", "--lengths", "512"], "--lengths do not apply to --data"),
    ("eval.py", ["--data", "<files>/ok.jsonl", "--plot-kept"], "--plot-kept do not apply to --data"),
    ("eval.py", ["--budgets", "0", "64"], "--budgets must be > 0 (got 0)"),
    ("eval.py", ["--lengths", "-1"], "--lengths must be > 0"),
    ("eval.py", ["--depths", "1.5"], "--depths must lie in [0, 1]"),
    ("eval.py", ["--depths", "nan"], "--depths must lie in [0, 1]"),
    ("eval.py", ["--budgets", "64", "64"], "--budgets lists a value twice"),
    ("eval.py", ["--methods", "laq", "laq"], "--methods lists a value twice"),
    ("eval.py", ["--agree-tokens", "0"], "--agree-tokens must be >= 1"),
    ("eval.py", ["--window", "0"], "--window must be >= 1"),
    ("eval.py", ["--pool-kernel", "2"], "--pool-kernel must be odd"),
    ("eval.py", ["--out", "<files>/occupied"], "is not empty: choose another folder or pass --overwrite"),
    ("eval.py", ["--out", "<files>/a_file"], "is a file, not a folder"),
    ("eval.py", ["--tasks", "haystack"], "invalid choice"),
    # bench.py
    ("bench.py", ["--lengths", "0"], "--lengths must be > 0"),
    ("bench.py", ["--budgets", "-1"], "--budgets must be > 0"),
    ("bench.py", ["--reps", "0"], "--reps must be >= 1"),
    ("bench.py", ["--steps", "0"], "--steps must be >= 1"),
    ("bench.py", ["--warmup", "-1"], "--warmup must be >= 0"),
    ("bench.py", ["--prefill-chunk", "0"], "--prefill-chunk must be > 0"),
    ("bench.py", ["--peers", "--peer-budget", "0"], "--peer-budget must be > 0 and below every --lengths"),
    ("bench.py", ["--peers", "--cache-limit", "64"], "--peers and --cache-limit are two separate runs"),
    ("generate.py", ["--evict-every", "0"], "--evict-every must be > 0"),  # with or without --cache-limit, as --draft-len
    ("bench.py", ["--peer-tokens", "0"], "--peer-tokens must be >= 1"),
    ("eval.py", ["--prefill-chunk", "0"], "--prefill-chunk must be > 0"),
    ("bench.py", ["--lengths", "64", "64"], "--lengths lists a value twice"),
    ("bench.py", ["--window", "0"], "--window must be >= 1"),
    ("bench.py", ["--methods", "full"], "invalid choice"),
    ("bench.py", ["--out", "<files>/occupied"], "is not empty"),
]

AFTER_TOKENIZER = [  # need the prompt's tokens or the model's context: checked after loading, before prefill
    ("generate.py", ["--ckpt", "/nonexistent/model.gguf"], "not found"),
    ("generate.py", ["--ckpt", "nosuchalias"], "not found"),
    ("generate.py", ["--prompt", "zebra " * 1100], "exceeds the model's context"),
    ("generate.py", ["--max-new-tokens", "2000"], "--max-new-tokens (2000) exceeds the model's context of 1024"),
    ("generate.py", ["--method", "laq", "--budget", "2", "--lookahead", "3000"], "--lookahead (3000) exceeds"),
    ("eval.py", ["--lengths", "5000", "--tasks", "passkey"], "exceed the model's context of 1024"),
    ("eval.py", ["--lengths", "60", "--tasks", "multikey"], "--lengths 60 is too short for multikey"),
    ("eval.py", ["--data", "<files>/ok.jsonl", "--agree-tokens", "600"], "--agree-tokens 600 leaves too little"),
    ("bench.py", ["--lengths", "3"], "--lengths must be >= "),
    ("bench.py", ["--lengths", "1010"], "exceed the model's context of 1024"),
    ("bench.py", ["--lengths", "1000", "--e2e-tokens", "100"], "--steps + --warmup or --e2e-tokens (1100 tokens)"),
    ("bench.py", ["--lengths", "1000", "--cache-limit", "64", "--decode-tokens", "100"], "--decode-tokens (1100 tokens)"),
    ("eval.py", ["--tasks", "listing", "--lengths", "900", "--answer-tokens", "200"], "--answer-tokens 200 exceed"),
]


@pytest.mark.parametrize("script,argv,message", BEFORE_MODEL, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_input_before_model_work(script, argv, message, ckpt, files, capsys):
    assert_one_line(*run_main(script, argv, ckpt, files, capsys, model_work_allowed=False), 2, message)


@pytest.mark.parametrize("script,argv,message", AFTER_TOKENIZER, ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else None)
def test_bad_input_after_tokenizing(script, argv, message, ckpt, files, capsys, monkeypatch):
    monkeypatch.setattr(G, "run", lambda *a, **k: pytest.fail("prefill before the error"))
    monkeypatch.setattr(E, "evaluate_task", lambda *a, **k: pytest.fail("evaluation before the error"))
    monkeypatch.setattr(B, "bench_length", lambda *a, **k: pytest.fail("benchmark before the error"))
    assert_one_line(*run_main(script, argv, ckpt, files, capsys), 2, message)
    assert not (files / "out").exists()  # nothing half-written


def test_cuda_device_that_is_not_there(ckpt, files, capsys):
    argv = ["--device", f"cuda:{torch.cuda.device_count()}"]
    assert_one_line(*run_main("generate.py", argv, ckpt, files, capsys, model_work_allowed=False), 2, "not available")


# ----------------------------------------------------------------------------------------------
# Valid edge inputs work, and say what lqc did with them

@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "adakv", "h2o", "laq", "laqpp", "streaming"])
def test_budget_below_a_short_prompt_within_the_window(method, ckpt, files, capsys):
    """budget < prompt length <= window (it crashed in max_pool1d): the window is clamped, with a note."""
    argv = ["--no-chat", "--prompt", "What is the capital of France?", "--budget", "4", "--method", method,
            "--max-new-tokens", "3"]
    code, out, err = run_main("generate.py", argv, ckpt, files, capsys)
    assert code == 0 and "Traceback" not in err and "KV kept 4/" in err.splitlines()[-1], err
    notes = [l for l in err.splitlines() if "note:" in l]
    if method == "streaming":
        assert notes == []
    else:
        assert len(notes) == 1 and "> --budget 4: clamped to 4" in notes[0], err


def test_one_token_prompt_budget_one(ckpt, files, capsys):
    code, out, err = run_main("generate.py", ["--no-chat", "--prompt", "a", "--budget", "1", "--max-new-tokens", "2"],
                              ckpt, files, capsys)
    lines = err.strip().splitlines()
    assert code == 0 and "nothing is evicted" in lines[-2] and "KV kept 1/1" in lines[-1], err


def test_budget_covering_the_prompt_says_nothing_is_evicted(ckpt, files, capsys):
    code, out, err = run_main("generate.py", ["--method", "snapkv", "--budget", "999", "--max-new-tokens", "2"],
                              ckpt, files, capsys)
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 2 and "--budget 999 >= the prompt's" in lines[0], err


LIMIT_NOTES = [  # the notes of runs under --cache-limit, checked against what the run did (issue: notes that lied)
    ["--method", "laq", "--budget", "256", "--cache-limit", "10", "--evict-every", "1"],
    ["--method", "laqpp", "--budget", "256", "--cache-limit", "12", "--evict-every", "1", "--no-reuse"],
    ["--method", "adakv", "--budget", "64", "--cache-limit", "16", "--evict-every", "4", "--fast"],
    *[["--method", m, "--budget", "8", "--cache-limit", "2", "--evict-every", "1"] for m in ("snapkv", "h2o")],
    *[["--method", m, "--budget", "16", "--cache-limit", "12", "--evict-every", "4"]
      for m in ("snapkv", "pyramidkv", "adakv", "h2o")],
    ["--method", "snapkv", "--budget", "64", "--cache-limit", "16", "--evict-every", "4"],
    ["--method", "snapkv", "--budget", "256", "--cache-limit", "500", "--evict-every", "4"],
    ["--method", "snapkv", "--budget", "256", "--cache-limit", "60", "--evict-every", "4", "--max-new-tokens", "40"],
]


@pytest.mark.parametrize("argv", LIMIT_NOTES, ids=lambda a: " ".join(a))
def test_notes_under_a_cache_limit_describe_the_run(argv, ckpt, files, capsys):
    """Every note is true of the run that happens: "nothing is evicted" only when the summary keeps
    the whole prompt and decoding never reaches the limit; a clamped window names the number of
    entries the prompt actually keeps (the limit where it is below the budget)."""
    argv = ["--no-chat", "--prompt", " ".join(TEXT.split()[:30]), "--max-new-tokens", "4", *argv]
    code, out, err = run_main("generate.py", argv, ckpt, files, capsys)
    assert code == 0, err
    kept, prompt = map(int, re.search(r"KV kept (\d+)/(\d+)", err).groups())
    budget, limit = int(argv[argv.index("--budget") + 1]), int(argv[argv.index("--cache-limit") + 1])
    new = int(argv[len(argv) - 1 - argv[::-1].index("--max-new-tokens") + 1])
    notes = [line for line in err.splitlines() if "note:" in line]
    assert kept == min(prompt, budget, limit)
    for note in notes:
        if "nothing is evicted" in note:
            assert kept == prompt and prompt + new - 1 <= limit, note
        if "decoding evicts" in note:
            assert kept == prompt and prompt + new - 1 > limit, note
        clamp = re.search(r"> (--\S+) (\d+): clamped to (\d+); \S+ keeps only the (\d+) most recent", note)
        if clamp:
            flag, n, to, recent = clamp.groups()
            assert int(n) == int(to) == int(recent) == kept, note
            assert flag == ("--cache-limit" if limit < budget else "--budget"), note
    if kept < prompt and min(budget, limit) < 32:  # the window (32) is above what the prompt keeps: a note says so
        assert any("clamped to" in n for n in notes), err
    if min(budget, limit) >= prompt:  # the prompt is kept whole: a note says what happens next
        assert len(notes) == 1 and ("nothing is evicted" in notes[0] or "decoding evicts" in notes[0]), err


def test_eval_notes_a_context_cut_in_the_middle(ckpt, files, capsys):
    long = files / "long.jsonl"
    long.write_text(json.dumps({"context": " ".join([TEXT] * 40), "input": "Who jumps?", "answers": ["the fox"]}) + "\n")
    code, out, err = run_main("eval.py", ["--data", str(long), "--methods", "full", "snapkv", "--budgets", "40",
                                          "--agree-tokens", "2", "--overwrite"], ckpt, files, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "1 of 1 prompts were longer than the model's context" in notes[0], err
    rows = json.loads((files / "out" / "results.json").read_text())["rows"]
    assert all(r["cut_from"] > r["prompt_tokens"] for r in rows)


def test_bench_notes_and_headers_say_what_was_run(ckpt, files, capsys):
    """A --peers run says nothing about the unused --budgets; a limit run that evicts while decoding
    does not say "nothing is evicted"; the limit table's header names the tokens it measured over."""
    code, out, err = run_main("bench.py", ["--peers", "--lengths", "64", "--peer-budget", "8", "--peer-tokens", "2",
                                           "--reps", "1", "--overwrite"], ckpt, files, capsys)
    assert code == 0 and "note:" not in err, err
    code, out, err = run_main("bench.py", ["--lengths", "64", "--budgets", "64", "--cache-limit", "66", "--evict-every",
                                           "2", "--decode-tokens", "8", "--methods", "snapkv", "--overwrite"],
                              ckpt, files, capsys)
    assert code == 0 and "nothing is evicted" not in err and "decoding evicts" in err, err
    assert "tok/s first 4 | tok/s last 4" in out
    rows = json.loads((files / "out" / "limit.json").read_text())["rows"]
    assert rows[-1]["evictions"] > 0


def test_failed_run_leaves_no_empty_out_folder(tmp_path):
    out = tmp_path / "new" / "out"

    def main():
        cli.start_out(out, ["x.json"])
        raise cli.BadInput("the run failed after creating --out")
    with pytest.raises(SystemExit):
        cli.exit_on_bad_input("bench.py", main)
    assert not out.exists()
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")

    def main2():
        cli.start_out(occupied, ["x.json"])
        raise cli.BadInput("fail")
    with pytest.raises(SystemExit):
        cli.exit_on_bad_input("bench.py", main2)
    assert (occupied / "keep.txt").exists()


def test_window_clamp_matches_the_unclamped_policy(ckpt):
    """The rule changes no result: with the window clamped to the budget, lqc keeps what it keeps
    with the window as given (when the prompt is longer than the window, where that works)."""
    import lqc
    model = tiny()
    ids = torch.randint(0, model.args.vocab_size, (1, 50), generator=torch.Generator().manual_seed(0))
    for method in ("snapkv", "h2o", "adakv", "pyramidkv", "laq", "laqpp"):
        kept = []
        for cfg in (lqc.EvictConfig(method=method, budget=6, window=20, window_laqpp=10, lookahead=3),
                    cli.evict_config(method=method, budget=6, window=20, window_laqpp=10, lookahead=3)):
            pre = D.prefill(model, ids, chunk=16, keep_queries=cfg.obs_window, h2o=lqc.METHODS[method].needs_mass)
            cache, _ = D.evict(cfg, model, pre)
            kept.append([p[p >= 0].tolist() for p in cache.pos])
        assert kept[0] == kept[1], method


def test_sampling_edges_work(ckpt, files, capsys):
    argv = ["--temperature", "1e-6", "--top-p", "1", "--top-k", "1", "--seed", str(2**64 - 1), "--max-new-tokens", "2",
            "--pool-kernel", "1", "--method", "snapkv", "--budget", "2", "--window", "2"]
    code, out, err = run_main("generate.py", argv, ckpt, files, capsys)
    assert code == 0 and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# eval.py / bench.py: outputs whole, incremental, strict

def test_eval_overwrite_replaces_an_earlier_run_and_writes_strict_json(ckpt, files, capsys):
    out = files / "occupied"
    (out / "heatmap.png").write_bytes(b"an old figure")
    (out / "notes.txt").write_text("the user's own file")
    argv = ["--data", "<files>/ok.jsonl", "--methods", "full", "snapkv", "--budgets", "8", "--agree-tokens", "3",
            "--out", str(out), "--overwrite"]
    code, stdout, err = run_main("eval.py", argv, ckpt, files, capsys)
    assert code == 0 and "| snapkv | 8 |" in stdout, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy_vs_budget.png", "notes.txt", "results.json", "results.md"]  # no old heatmap
    result = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert result["complete"] and result["rows"][0]["depth"] is None  # NaN written as null


def test_eval_interrupted_keeps_the_finished_tasks(ckpt, files, capsys, monkeypatch):
    data = files / "three.jsonl"
    data.write_text("\n".join([(files / "ok.jsonl").read_text().splitlines()[0]] * 3))
    real, calls = E.evaluate_task, []

    def interrupted_at_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(E, "evaluate_task", interrupted_at_the_third)
    argv = ["--data", str(data), "--methods", "full", "--budgets", "8", "--agree-tokens", "3"]
    code, out, err = run_main("eval.py", argv, ckpt, files, capsys)
    assert code == 130 and "Traceback" not in err
    result = json.loads((files / "out" / "results.json").read_text())
    assert not result["complete"] and len(result["rows"]) == 2
    assert sorted(p.name for p in (files / "out").iterdir()) == ["results.json"]  # no temporary file left


def test_a_full_disk_is_one_line_and_exit_1(ckpt, files, capsys, monkeypatch):
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_text", no_space)
    argv = ["--data", "<files>/ok.jsonl", "--methods", "full", "--budgets", "8", "--agree-tokens", "3"]
    code, out, err = run_main("eval.py", argv, ckpt, files, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and len([l for l in lines if "error" in l]) == 1
    assert "cannot write" in lines[-1] and "No space left on device" in lines[-1]
    assert not (files / "out").exists()  # nothing half-written: not even the empty folder the run created


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(cli.CannotWrite, match="No space left on device"):
        cli.write_atomic(target, half_then_full)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_bench_writes_each_length_and_prompts_have_their_length(ckpt, files, capsys):
    argv = ["--lengths", "30", "50", "--budgets", "8", "--methods", "snapkv", "--reps", "1", "--steps", "1",
            "--warmup", "0", "--no-compile"]
    code, out, err = run_main("bench.py", argv, ckpt, files, capsys)
    assert code == 0 and "Traceback" not in err, err
    result = json.loads((files / "out" / "bench.json").read_text())
    assert result["complete"] and [r["length"] for r in result["rows"]] == [30, 30, 50, 50]


def test_bench_prompt_has_exactly_the_asked_length(ckpt):
    from checkpoint import load
    tok = load(ckpt, torch.device("cpu"), torch.float32)[1]
    shortest = len(tok.encode(B.QUESTION)) + 1
    for n in (shortest, 100, 1000):
        ids = B.prompt_ids(tok, n)
        assert len(ids) == n and ids[-shortest + 1:] == tok.encode(B.QUESTION)


# ----------------------------------------------------------------------------------------------
# Honest exits

def test_a_bug_is_not_bad_input(capsys):
    """Only BadInput (and CheckpointError) mean exit 2; any other ValueError is a bug and propagates."""
    def buggy():
        raise ValueError("an internal bug")
    with pytest.raises(ValueError, match="an internal bug"):
        cli.exit_on_bad_input("x.py", buggy)
    with pytest.raises(SystemExit) as e:
        cli.exit_on_bad_input("x.py", lambda: (_ for _ in ()).throw(cli.BadInput("--x is wrong")))
    assert e.value.code == 2 and capsys.readouterr().err == "x.py: error: --x is wrong\n"


def test_evict_config_errors_of_lqc_become_bad_input(monkeypatch):
    import lqc

    def refuse(**kw):
        raise ValueError("lqc says no")
    monkeypatch.setattr(lqc, "EvictConfig", refuse)
    with pytest.raises(cli.BadInput, match="lqc says no"):
        cli.evict_config(method="snapkv", budget=4)


def test_ci_profile_is_derandomized():
    from test_lqc import FAST
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert FAST.derandomize and FAST.max_examples == 12


# ----------------------------------------------------------------------------------------------
# Real processes: file descriptors and signals

def spawn(ckpt, *args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--ckpt", ckpt, *args], cwd=ROOT,
                            stderr=subprocess.PIPE, **kw)


def finish(p, timeout=120):
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode()


def test_stdin_not_utf8_closed_and_empty(ckpt):
    cases = [(b"quick \xff zebras", None, "stdin is not UTF-8: byte 0xff at byte position 6"),
             (None, lambda: os.close(0), "stdin is closed"),
             (b"", None, "the prompt is empty")]
    for data, pre, message in cases:
        p = spawn(ckpt, stdin=subprocess.PIPE if data is not None else None, stdout=subprocess.PIPE, preexec_fn=pre)
        out, err = p.communicate(data, timeout=120)
        assert_one_line(p.returncode, out.decode(), err.decode(), 2, message)


def test_stdout_closed_early_is_a_quiet_exit(ckpt):
    p = spawn(ckpt, "--prompt", "quick zebras", "--method", "full", "--max-new-tokens", "1000", stdout=subprocess.PIPE)
    p.stdout.read(10)  # `| head -c 10`
    p.stdout.close()
    code, err = finish(p)
    assert code == 141 and err == "", err


def test_stdout_on_a_full_disk_is_one_line(ckpt):
    with open("/dev/full", "w") as full:
        code, err = finish(spawn(ckpt, "--prompt", "quick zebras", "--method", "full", "--max-new-tokens", "5",
                                 stdout=full))
    assert_one_line(code, "", err, 1, "cannot write to stdout: No space left on device")


def wait_for(p, condition, timeout=60):
    t = time.time()
    while not condition():
        assert p.poll() is None and time.time() - t < timeout, "the process never reached the moment"
        time.sleep(0.02)


def test_ctrl_c_at_any_moment_exits_130_quietly(ckpt):
    def loaded(lib):
        return lambda: lib in Path(f"/proc/{p.pid}/maps").read_text()

    def waiting_on_stdin():
        return "pipe" in Path(f"/proc/{p.pid}/wchan").read_text()  # pipe_read, anon_pipe_read, ...

    moments = [("while torch imports", dict(stdin=subprocess.DEVNULL), loaded("libtorch")),
               ("while reading stdin", dict(stdin=subprocess.PIPE), waiting_on_stdin)]
    for moment, kw, ready in moments:
        p = spawn(ckpt, "--method", "full", stdout=subprocess.PIPE, **kw)
        wait_for(p, ready)
        p.send_signal(signal.SIGINT)
        code, err = finish(p)
        assert code == 130 and "Traceback" not in err and err == "", (moment, err)
    # while decoding: the first streamed bytes say it has started
    p = spawn(ckpt, "--prompt", "quick zebras", "--method", "full", "--max-new-tokens", "1000", stdout=subprocess.PIPE)
    p.stdout.read(1)
    p.send_signal(signal.SIGINT)
    code, err = finish(p)
    assert code == 130 and "Traceback" not in err, err
