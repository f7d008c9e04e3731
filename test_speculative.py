"""Speculative decoding: LAQ's pseudo tokens reused as a draft, and verify mode (the compacted cache
drafts, the full cache checks). Greedy output must equal plain decoding token for token; sampled
output must follow the same distribution (checked against exact probabilities, seeded)."""
from __future__ import annotations

import pytest
import torch

import decoding as D
import eval as E
import lqc
from sampling import accept, Sampling
from speculative import PseudoDraft
from steps import to_static
from test_lqc import rand_ids, small_cfg, smollm2, tiny  # noqa: F401 (smollm2: a fixture)


def prompts_of(model, lengths, seed=0):
    return [rand_ids(model, n, seed + i)[0].tolist() for i, n in enumerate(lengths)]


# ----------------------------------------------------------------------------------------------
# Greedy: the same tokens as without speculation

@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("method", ["laq", "laqpp"])
def test_reuse_equals_no_reuse(method, fast):
    model = tiny(4, 2, n_layers=3)
    prompts = prompts_of(model, [50, 37, 61])
    cfg = small_cfg(method, 12, lookahead=6)
    ref, plain = D.run_batch(model, prompts, cfg, max_new_tokens=24, reuse=False, fast=fast)
    out, stats = D.run_batch(model, prompts, cfg, max_new_tokens=24, reuse=True, fast=fast)
    assert out == ref
    assert plain.drafted == 0 and stats.drafted == 3 * 7  # 6 fed pseudo tokens and the choice after them, per row
    assert 3 <= stats.accepted <= stats.drafted  # greedy: the first pseudo token is the first real token


def decode_with_draft(model, prompts, cfg, draft_tokens, *, static, steps=12, eos_ids=()):
    """Prefill, evict, then decode with a hand-made first-round draft `[B, m]`; returns (tokens, draft,
    valid positions per row, layer and head after decoding)."""
    x, pad = D.left_pad(prompts, "cpu")
    pre = D.prefill(model, x, chunk=16, keep_queries=cfg.obs_window, pad=pad)
    cache, _ = D.evict(cfg, model, pre)
    if static:
        cache = to_static(model, cache, steps + 2 * draft_tokens.shape[1] + 1, flex=False)
    draft = PseudoDraft(tokens=draft_tokens) if draft_tokens.shape[1] else None
    out = D.decode(model, cache, pre.obs.logits, pre.obs.next_pos, max_new_tokens=steps, eos_ids=eos_ids, draft=draft)
    kept = [[[sorted(p[b, h][p[b, h] >= 0].tolist()) for h in range(p.shape[1])] for p in cache.pos]
            for b in range(len(prompts))]
    return out, draft, kept


@pytest.mark.parametrize("method", ["snapkv", "adakv", "laqpp"])  # adakv: heads keep different numbers
def test_rows_accepting_different_lengths_rewind_to_the_same_cache(method):
    model = tiny(4, 2, n_layers=3)
    prompts = prompts_of(model, [50, 37, 61], seed=3)
    cfg = small_cfg(method, 12)
    empty = torch.zeros(3, 0, dtype=torch.long)
    ref, _, ref_kept = decode_with_draft(model, prompts, cfg, empty, static=False)
    wrong = lambda t: (t + 1) % model.args.vocab_size
    # row 0: all 6 accepted; row 1: 2 then a wrong token; row 2: wrong at once
    draft = torch.tensor([ref[0][:6], ref[1][:2] + [wrong(ref[1][2])] + ref[1][3:6], [wrong(ref[2][0])] + ref[2][1:6]])
    for static in (False, True):
        out, d, kept = decode_with_draft(model, prompts, cfg, draft, static=static)
        assert out == ref
        assert (d.drafted, d.accepted) == (18, 6 + 2 + 0)
        # the rejected tokens left nothing behind: every head holds the positions plain decoding left
        assert kept == ref_kept, f"static={static}"


def test_eos_inside_the_draft_ends_the_row():
    model = tiny(4, 2, n_layers=3)
    prompts = prompts_of(model, [50, 41], seed=5)
    cfg = small_cfg("snapkv", 12)
    ref, _, _ = decode_with_draft(model, prompts, cfg, torch.zeros(2, 0, dtype=torch.long), static=False)
    eos = ref[0][3]
    cut = [r[:r.index(eos)] if eos in r else r for r in ref]
    draft = torch.tensor([ref[0][:8], ref[1][:8]])  # row 0's draft holds the EOS at index 3
    for static in (False, True):
        out, d, _ = decode_with_draft(model, prompts, cfg, draft, static=static, eos_ids=(eos,))
        assert out == cut and len(out[0]) == 3


def test_reuse_with_eos_among_the_pseudo_tokens():
    model = tiny(4, 2, n_layers=3)
    prompts = prompts_of(model, [50, 44], seed=21)
    cfg = small_cfg("laq", 12, lookahead=6)
    seen = []
    D.evict(cfg, model, D.prefill(model, *D.left_pad(prompts, "cpu")[:1], chunk=16, keep_queries=cfg.obs_window,
                                  pad=D.left_pad(prompts, "cpu")[1]), on_pseudo=seen.append)
    eos = seen[0][0, 2].item()  # row 0's third pseudo token becomes an EOS
    ref, _ = D.run_batch(model, prompts, cfg, max_new_tokens=12, eos_ids=(eos,), reuse=False)
    out, stats = D.run_batch(model, prompts, cfg, max_new_tokens=12, eos_ids=(eos,), reuse=True)
    assert out == ref and stats.drafted > 0


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("method", ["snapkv", "adakv", "laqpp", "streaming"])
def test_verify_equals_full_cache(method, fast):
    model = tiny(4, 2, n_layers=3)
    prompts = prompts_of(model, [50, 37], seed=7)
    ref, _ = D.run_batch(model, prompts, small_cfg("full", 8), max_new_tokens=20, fast=fast)
    out, stats = D.run_batch(model, prompts, small_cfg(method, 8), max_new_tokens=20, fast=fast, verify="full",
                             draft_len=3)
    assert out == ref
    assert 0 < stats.accepted < stats.drafted  # budget 8 of ~40: the compacted cache's drafts are not all right


def test_verify_with_nothing_evicted_is_plain_decoding():
    model = tiny(4, 2)
    prompts = prompts_of(model, [20])
    ref, _ = D.run_batch(model, prompts, small_cfg("full", 8), max_new_tokens=6)
    out, stats = D.run_batch(model, prompts, small_cfg("snapkv", 64), max_new_tokens=6, verify="full")
    assert out == ref and stats.drafted == 0


def test_smollm2_reuse_and_verify_equal_their_references(smollm2):
    model, tok = smollm2
    ids = tok.prompt_ids("Name the largest planet of the solar system and say why it is so large.", chat=True)
    cfg = lqc.EvictConfig(method="laqpp", budget=16, window=8, window_laqpp=4)
    kw = dict(max_new_tokens=10, eos_ids=tok.eos_ids)
    ref, _ = D.run(model, ids, cfg, reuse=False, **kw)
    out, stats = D.run(model, ids, cfg, reuse=True, **kw)
    assert out == ref and stats.accepted >= 1
    full, _ = D.run(model, ids, lqc.EvictConfig(method="full"), **kw)
    out, stats = D.run(model, ids, cfg, verify="full", draft_len=3, **kw)
    assert out == full and stats.drafted > 0


# ----------------------------------------------------------------------------------------------
# Sampling: the accepted tokens follow the target's distribution, whatever the draft

def within(counts: torch.Tensor, p: torch.Tensor, n: int, sigmas: float = 5.0) -> bool:
    """Empirical frequencies counts / n within `sigmas` standard errors of p (and 1e-9 slack)."""
    se = (p * (1 - p) / n).sqrt()
    return bool(((counts / n - p).abs() <= sigmas * se + 1e-9).all())


@pytest.mark.parametrize("draft", ["deterministic", "sampled"])
def test_acceptance_rule_preserves_the_target_distribution(draft):
    N, V = 40_000, 5
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.4, 0.3, 0.2, 0.05], [0.1, 0.1, 0.5, 0.2, 0.1]])  # target at the draft position, after it
    q = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])  # the draft's own distribution, far from p
    if draft == "deterministic":
        x, qx = torch.full((N, 1), 3), None  # accepted with probability p(3) = 0.2
    else:
        x, qx = torch.multinomial(q.expand(N, V), 1, generator=gen), q.expand(N, 1, V)
    n, nxt = accept(p.log().expand(N, 2, V), x, qx, Sampling(temperature=1.0), gen)
    first = torch.where(n == 1, x[:, 0], nxt)  # the token at the draft position
    assert within(torch.bincount(first, minlength=V).float(), p[0], N)
    after = nxt[n == 1]  # after an accepted draft token: a draw from the next position's p
    assert within(torch.bincount(after, minlength=V).float(), p[1], len(after))
    accept_rate = p[0, 3] if draft == "deterministic" else torch.minimum(p[0], q).sum()
    assert within(n.sum().float(), accept_rate, N)


def exact_two_tokens(model, cache, logits, next_pos, V):
    """p(t0, t1) `[V, V]` of plain sampling (temperature 1) over `cache` (one row), by enumeration."""
    p0 = logits[0].softmax(-1)
    rows = []
    for t in range(V):
        c = cache.clone()
        rows.append(model(torch.tensor([[t]]), next_pos[:, None], c)[0, -1].softmax(-1))
    return p0[:, None] * torch.stack(rows)


@pytest.mark.parametrize("mode", ["reuse", "verify"])
def test_sampled_output_follows_plain_sampling(mode):
    """N copies of one prompt in a batch, each row sampling on its own: the first two tokens' joint
    frequencies match the exact distribution of plain sampling (the compacted cache's for reuse,
    the full cache's for verify)."""
    V, N = 6, 2000
    model = tiny(4, 2, vocab_size=V)
    ids = rand_ids(model, 30, 1)[0].tolist()
    cfg = small_cfg("laqpp", 8, lookahead=4)
    pre = D.prefill(model, torch.tensor([ids]), chunk=16, keep_queries=cfg.obs_window)
    target = pre.cache.clone() if mode == "verify" else D.evict(cfg, model, pre)[0]
    p = exact_two_tokens(model, target, pre.obs.logits, pre.obs.next_pos, V)
    # 3 tokens: verify's first draft token comes from the prefill logits and is always accepted
    out, stats = D.run_batch(model, [ids] * N, cfg, max_new_tokens=3, sampling=Sampling(temperature=1.0, seed=0),
                             reuse=mode == "reuse", verify="full" if mode == "verify" else None, draft_len=2)
    assert 0 < stats.accepted < stats.drafted
    pairs = torch.tensor([o[0] * V + o[1] for o in out])
    assert within(torch.bincount(pairs, minlength=V * V).float(), p.flatten(), N)


# ----------------------------------------------------------------------------------------------
# eval.py's acceptance rate replays verify mode from teacher-forced matches

def test_eval_acceptance_equals_verify_mode_counts():
    assert E.draft_acceptance([True] * 11, 4) == 1.0
    assert E.draft_acceptance([True, False, True, True, True], 2) == 3 / 4
    model = tiny(4, 2, n_layers=3)
    ids = rand_ids(model, 50, 9)[0].tolist()
    cfg, n, k = small_cfg("snapkv", 8), 16, 3
    full, _ = D.run(model, ids, small_cfg("full", 8), max_new_tokens=n)
    _, stats = D.run(model, ids, cfg, max_new_tokens=n, verify="full", draft_len=k)
    pre = D.prefill(model, torch.tensor([ids]), chunk=16, keep_queries=cfg.obs_window)
    cache, _ = D.evict(cfg, model, pre)
    tf = E.continuation_logits(model, cache, pre.obs.logits, ids[-1], full, len(ids), "prefill")  # [n, V]
    matches = (tf.argmax(-1) == torch.tensor(full)).tolist()
    assert not all(matches) and E.draft_acceptance(matches, k) == stats.accepted / stats.drafted
