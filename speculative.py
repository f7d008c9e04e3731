"""Speculative decoding: the drafts a decoding round checks. Reuse (LAQ's pseudo tokens as the
first round's draft) and verify mode (the compacted cache drafts, the full cache checks: lossless).
The rule that accepts or rejects a draft is `sampling.accept`; the loop is `decoding.decode`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import lqc
from sampling import Sampling, probs, sample

DRAFT_LEN = 4  # verify mode's draft tokens per round (README: acceptance and speed)


@dataclass(kw_only=True)
class Draft:
    """Speculative decoding's proposer. `propose(pending, logits, pos, n, gen)` returns up to n draft
    tokens `[B, k]` for positions pos, pos + 1, ... and the probabilities they were drawn from
    `[B, k, V]` (None: deterministic), or None when it has nothing (more) to propose. pending `[B]` is
    the last emitted token, at pos - 1, not yet in any cache (None on the first round, when `logits`
    `[B, V]`, the prefill logits, hold position pos). `rewind(limit)` drops what it holds at positions
    >= limit `[B]`. drafted / accepted count the tokens of rows still running."""
    drafted: int = 0
    accepted: int = 0

    def rewind(self, limit: torch.Tensor):
        pass


@dataclass(kw_only=True)
class PseudoDraft(Draft):
    """Reuse: LAQ's pseudo tokens `[B, m]` as the draft of the first round only. They were decoded
    greedily on a SnapKV copy of the cache, so they are a deterministic draft."""
    tokens: torch.Tensor | None

    def propose(self, pending, logits, pos, n, gen=None):
        tokens, self.tokens = self.tokens, None
        return None if tokens is None else (tokens[:, :n], None)


@dataclass(kw_only=True)
class CacheDraft(Draft):
    """Verify mode: the compacted cache drafts k tokens per round (sampled as the output is), for the
    full cache to check. It is fed the pending token and every draft token, and rewound with the
    full cache, so both always hold the same tokens."""
    cache: object
    step: object  # the decode step (steps.py): tokens, pos [B, 1], cache -> (logits [B, V], queries)
    k: int
    sampling: Sampling

    def propose(self, pending, logits, pos, n, gen=None):
        z = logits if pending is None else self.step(pending[:, None], (pos - 1)[:, None], self.cache)[0]  # [B, V]
        tokens, q = [], []
        for j in range(min(self.k, n)):
            tokens.append(sample(z, self.sampling, gen))
            if self.sampling.temperature > 0:
                q.append(probs(z, self.sampling))
            z = self.step(tokens[-1][:, None], (pos + j)[:, None], self.cache)[0]
        if not tokens:
            return pos.new_zeros(pos.shape[0], 0), None
        return torch.stack(tokens, 1), torch.stack(q, 1) if q else None

    def rewind(self, limit):
        self.cache.rewind(limit)


def draft_tokens(cfg: lqc.EvictConfig, reuse: bool, verify: str | None, draft_len: int) -> int:
    """The most draft tokens a decoding round feeds: --draft-len in verify mode, LAQ's pseudo tokens
    when they are reused, none otherwise."""
    if verify:
        return draft_len
    return cfg.lookahead + 1 if reuse and cfg.looks_ahead else 0
