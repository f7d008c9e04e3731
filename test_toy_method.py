"""Adding a method is one entry in lqc.METHODS plus its score function: a toy method, added here
and nowhere else, runs through generate (prompt eviction, a cache limit, the fast path), eval,
bench and serve."""
from __future__ import annotations

import json

import pytest
import torch

import bench as B
import eval as E
import decoding as D
import generate as G
import lqc
import serve as S
from test_lqc import TEXT, rand_ids, save_hf_dir, tiny
from test_serve import STUB_TOK


def score_key_norm(k: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Keep the keys of largest norm (a toy, not a good policy). k `[B, H_kv, L, D]` -> `[B, H_kv, L]`."""
    return k.float().norm(dim=-1).masked_fill(k_pos < 0, float("-inf"))


TOY = lqc.Method(
    label="key norm",
    scores=lambda cfg, obs, keys, positions: [score_key_norm(k, p) for k, p in zip(keys, positions)],
    keep_last=lambda cfg: 0,
    limit_scores=lambda cfg, k, k_pos, keep, **_: lqc.keep_recent(score_key_norm(k, k_pos), k_pos, 0),
    style=("tab:green", "x", "-"))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(lqc.METHODS, "toy", TOY)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_hf_dir(tiny(), tmp_path_factory.mktemp("toy") / "tiny"))


def kept_in(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("[toy]")).split("KV kept ")[1].split(" ")[0]


@pytest.mark.parametrize("extra, kept", [([], "16/"), (["--fast"], "16/"), (["--cache-limit", "24", "--evict-every", "4"], "")])
def test_toy_method_through_generate(toy, ckpt, capfd, extra, kept):
    G.main(**vars(G.parse_args(["--ckpt", ckpt, "--prompt", TEXT, "--method", "toy", "--budget", "16",
                                "--max-new-tokens", "12", *extra])))
    got = kept_in(capfd.readouterr().err)
    assert got.startswith(kept) if kept else int(got.split("/")[0]) <= 24


def test_toy_method_keeps_the_largest_keys(toy):
    model = tiny()
    ids = torch.randint(0, model.args.vocab_size, (1, 60), generator=torch.Generator().manual_seed(1))
    pre = D.prefill(model, ids)
    cache, indices = D.evict(lqc.EvictConfig(method="toy", budget=10), model, pre)
    for l, idx in enumerate(indices):
        want = pre.cache.k[l].norm(dim=-1).topk(10, dim=-1).indices.sort(-1).values
        assert torch.equal(idx, want)


def test_toy_method_through_eval_and_bench(toy, ckpt, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"context": TEXT * 2, "input": "Who jumps?", "answers": ["the fox"]}) + "\n")
    summary = E.main(E.parse_args(["--ckpt", ckpt, "--data", str(data), "--methods", "full", "toy", "snapkv",
                                   "--budgets", "16", "--window", "8", "--agree-tokens", "4", "--out", str(tmp_path / "e")]))
    assert 0 < summary[("toy", 16)]["recall"] < 1 and summary[("toy", 16)]["kl"] > 0
    assert (tmp_path / "e" / "accuracy_vs_budget.png").stat().st_size > 1000  # the entry's style is drawn
    suite = E.main(E.parse_args(["--ckpt", ckpt, "--suite", "ruler", "--tasks", "niah_word", "--lengths", "900",
                                 "--seeds", "1", "--methods", "full", "toy", "--budgets", "32", "--out",
                                 str(tmp_path / "s")]))
    assert suite[(900, "all", "toy", 32)]["n"] == 1
    result = B.main(B.parse_args(["--ckpt", ckpt, "--lengths", "96", "--budgets", "16", "--methods", "toy", "snapkv",
                                  "--window", "8", "--reps", "1", "--no-compile", "--e2e-tokens", "4",
                                  "--out", str(tmp_path / "b")]))
    row = next(r for r in result["rows"] if r["budget"] == 16)
    assert row["evict_toy"] > 0 and row["evict_snapkv"] > 0  # eviction time as a share of prefill
    assert any(r["method"] == "toy" for r in result["end_to_end"])


@pytest.mark.parametrize("limit", [None, 12])
def test_toy_method_through_serve(toy, limit):
    """Slots sized by the entry (budget + answer), or by a cache limit with the entry's decode-time
    rule: each request's answer equals the request alone."""
    model = tiny(4, 2, n_layers=2)
    cfg = lqc.EvictConfig(method="toy", budget=8)
    reqs = [S.Request(i, i + 1, rand_ids(model, n, i)[0].tolist(), cfg, 10) for i, n in enumerate([30, 20, 40])]
    capacity = limit or S.plan_slots(model, reqs, 10**9, cfg, 10)[1]
    server = S.Server(model, STUB_TOK, n_slots=2, capacity=capacity,
                      limit_cfg=cfg if limit else None, evict_every=4)
    records = {}
    server.run(reqs, lambda rec: records.update({rec["id"]: rec}))
    for r in reqs:
        alone, _ = D.run(model, r.ids, cfg, max_new_tokens=10, reuse=False, cache_limit=limit, evict_every=4)
        assert records[r.id]["token_ids"] == alone
    assert capacity == (12 if limit else 8 + 10)
