"""The RULER-style suite: generated tasks (ruler.py) and eval.py --suite (batched rows, resume,
--minutes), offline on SmolLM2's tokenizer and a tiny random model."""
from __future__ import annotations

import json
import math

import pytest
import torch

import checkpoint as C
import eval as E
import decoding as D
import model as M
import ruler
from test_lqc import rand_ids, save_hf_dir, small_cfg, tiny


@pytest.fixture(scope="module")
def tok():
    return C.load("smollm2")[1]


@pytest.mark.parametrize("name", list(ruler.SUITE))
def test_suite_tasks_fit_their_length_and_hold_their_answers(tok, name):
    for length in (1024, 2048):
        a = ruler.SUITE[name](tok, length, 0.3, 1, haystack="noise", name=name)
        b = ruler.SUITE[name](tok, length, 0.3, 1, haystack="noise", name=name)
        assert repr(a) == repr(b) != repr(ruler.SUITE[name](tok, length, 0.3, 2, haystack="noise", name=name))
        n = len(E.task_prompt_ids(tok, a))
        assert 0.75 * length < n <= length, (name, length, n)
        assert a.expected and all(e in a.context for e in a.expected if name != "fwe")
        assert ruler.score(" ".join(a.expected).upper(), a.expected) == 1.0
    if name.startswith("niah") or name == "vt":
        assert a.context[a.needle_char:].startswith(("One of the special", "VAR "))


def test_counting_tasks_ask_for_what_the_text_holds(tok):
    cwe = ruler.make_cwe(tok, 4096, 0.5, 0)
    words = [w.split(". ", 1)[1] for w in cwe.context.split("\n")[1].split(" ") if ". " in w] or \
        [w for w in cwe.context.split("\n")[1].split() if not w[0].isdigit()]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts.values(), reverse=True)
    common = {counts[w] for w in cwe.expected}
    assert len(common) == 1 and common.pop() == top[0] >= 2 * 3 and top[10] == 3  # 10 common words, then rare ones
    fwe = ruler.make_fwe(tok, 2048, 0.5, 0)
    coded = fwe.context.split("\n")[0].split(". ", 1)[1].split(" .... ")
    coded[0] = coded[0].split()[-1]
    counts = {w: coded.count(w) for w in set(coded)}
    assert [counts[w] for w in fwe.expected] == sorted(counts.values(), reverse=True)[:3]
    vt = ruler.make_vt(tok, 2048, 0.2, 2)  # seed 2: a chain of 4
    assert len(vt.expected) == 4 and f"VAR {vt.expected[0]} = " in vt.context


def test_score_and_wilson_interval():
    assert ruler.score("The numbers are 123 and 456.", ("123", "456", "789")) == pytest.approx(2 / 3)
    assert ruler.score("UUID: ABC-def", ("abc-DEF",)) == 1.0
    lo, hi = ruler.wilson(8, 10)  # known value: 0.8 of 10 -> [0.490, 0.943]
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert ruler.wilson(0, 5)[0] == 0.0 and ruler.wilson(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in ruler.wilson(0, 0))


def test_build_spreads_depths_and_haystacks_seed_major(tok):
    samples = ruler.build(tok, ["niah_number", "cwe"], [1024], [0.1, 0.5, 0.9], 4)
    assert [s.seed for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    niah = [s for s in samples if s.name == "niah_number"]
    assert {s.depth for s in niah} == {0.1, 0.5, 0.9} and {s.haystack for s in niah} == {"varied", "noise"}


# ----------------------------------------------------------------------------------------------
# Batched rows equal rows alone: what makes one batched decode per prompt a fair shortcut

def test_stacked_evicted_caches_decode_as_each_alone():
    model = tiny()
    pre = D.prefill(model, rand_ids(model, 150), keep_queries=8)
    caches = [D.evict(small_cfg(m, b), model, pre)[0] for m, b in (("snapkv", 24), ("laqpp", 40), ("adakv", 32))]
    batch = M.KVCache.stack(caches)
    assert batch.k[0].shape[0] == 3 and batch.k[0].shape[2] == max(c.width(0) for c in caches)
    rows = E.greedy_rows(model, batch, pre.obs.logits, 7, 150, "redecode", 12, ())
    alone = [E.greedy(model, c, pre.obs.logits, 7, 150, "redecode", 12, ()) for c in caches]
    assert rows == alone
    forced = alone[0]
    tf = E.continuation_rows(model, batch, pre.obs.logits, 7, forced, 150, "redecode")
    for r, c in enumerate(caches):
        one = E.continuation_logits(model, c, pre.obs.logits, 7, forced, 150, "redecode")
        torch.testing.assert_close(tf[r], one, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# eval.py --suite end to end: resumable, --minutes, refusals

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_hf_dir(tiny(), tmp_path_factory.mktemp("suite") / "tiny"))


def suite_args(ckpt, out, *extra):
    return E.parse_args(["--ckpt", ckpt, "--suite", "ruler", "--tasks", "niah_number", "vt", "--lengths", "900",
                         "--seeds", "2", "--budgets", "32", "64", "--methods", "full", "snapkv", "laqpp", "h2o",
                         "--window", "8", "--lookahead", "3", "--out", str(out), *extra])


def test_suite_runs_resumes_and_summarizes(tmp_path, tiny_dir, capfd):
    out = tmp_path / "out"
    summary = E.main(suite_args(tiny_dir, out))
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["config"]["methods"] == ["full", "snapkv", "laqpp", "h2o"] and len(lines) == 1 + 4
    rows = [r for ln in lines[1:] for r in json.loads(ln)["rows"]]
    assert len(rows) == 4 * (1 + 3 * 2)
    full = summary[(900, "all", "full", "full")]
    assert full["n"] == 4 and full["kl"] == 0.0 and full["agree"] == 1.0 and full["lo"] <= full["acc"] <= full["hi"]
    for m in ("snapkv", "laqpp", "h2o"):
        assert summary[(900, "all", m, 32)]["kl"] > 0 and 0 < summary[(900, "all", m, 32)]["recall"] < 1
    assert "suite acc [95% CI]" in (out / "results.md").read_text() and (out / "suite.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["complete"]
    # a kill mid-line: the cut line is dropped and its prompt run again; the others are skipped
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    capfd.readouterr()
    again = E.main(suite_args(tiny_dir, out))
    err = capfd.readouterr().err
    assert "2 of 4 prompts are done" in err and "[2/2]" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    assert again[(900, "all", "full", "full")]["n"] == 4


def test_suite_refuses_another_config_in_the_same_out(tmp_path, tiny_dir):
    out = tmp_path / "out"
    E.main(suite_args(tiny_dir, out, "--minutes", "0.0001"))  # stops before the second prompt
    assert not json.loads((out / "results.json").read_text())["complete"]
    with pytest.raises(E.BadInput, match="other settings .*budgets"):
        E.main(E.parse_args(["--ckpt", tiny_dir, "--suite", "ruler", "--tasks", "niah_number", "--lengths", "900",
                             "--budgets", "16", "--methods", "full", "snapkv", "laqpp", "h2o", "--out", str(out)]))


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "niah_number", "passkey"], "mixes"),
    (["--minutes", "5"], "--minutes applies to --suite"),
    (["--suite", "ruler", "--minutes", "-1"], "positive"),
    (["--suite", "ruler", "--data", "x.jsonl"], "does not apply to --data"),
])
def test_suite_flags_refused_in_one_line(flags, message):
    with pytest.raises(E.BadInput, match=message):
        E.check_args(E.parse_args(flags))


def test_tasks_are_the_same_in_every_process():
    """No set iteration order (which varies with PYTHONHASHSEED) may leak into a task: a resumed run
    and a rerun must ask the same questions."""
    import os
    import subprocess
    import sys
    code = ("import ruler, checkpoint; tok = checkpoint.load('smollm2')[1]; "
            "print([ruler.SUITE[n](tok, 1024, 0.3, 2, haystack='noise', name=n).expected for n in ruler.SUITE])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and "cwe" not in outs and outs.pop().startswith("[(")
