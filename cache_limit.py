"""Bounded memory (`--cache-limit`): eviction during decoding. The rules that score entries live in
lqc.py (`plan_limit`, each method's `limit_scores`); this file keeps the state a rule reads while
decoding (the last decode queries, or H2O's accumulated mass) and decides when to evict."""
from __future__ import annotations

import time
from collections import deque

import torch
import torch.nn.functional as F

import lqc
import model as M
from cli import BadInput
from steps import sync

EVICT_EVERY = 32  # slots freed per decode-time eviction: eviction work stays a few % of decode (README)


def check_limit(cfg: lqc.EvictConfig, cache_limit: int, evict_every: int, verify: str | None, draft: int = 0,
                kv_bits: int | None = None):
    if cfg.method == "full":
        raise BadInput("--cache-limit needs an evicting method (full keeps every entry)")
    if not 1 <= evict_every < cache_limit:
        raise BadInput(f"need 1 <= --evict-every < --cache-limit (got {evict_every} and {cache_limit})")
    if verify:
        raise BadInput("--cache-limit and --verify full do not go together: verification keeps the full cache")
    if kv_bits:  # decode-time eviction scores the stored keys, which are int8 rows then
        raise BadInput("--cache-limit and --kv-bits 8 do not go together yet: decode-time eviction reads full-precision keys")
    if draft >= cache_limit:  # the first round feeds LAQ's reused pseudo tokens at once: the cache must hold them
        raise BadInput(f"--cache-limit {cache_limit} must exceed the {draft} pseudo tokens that reusing LAQ's lookahead "
                       f"feeds in one round: raise it, or pass --no-reuse")


class Evictor:
    """Bounded memory (a cache limit): before each decode round, each row whose fullest KV head has no
    room for the round's entries is evicted down to `limit - every` in one go (`lqc.plan_limit`), so the
    scoring cost is paid once per `every` tokens. `step` wraps the single-token step `step(tokens,
    pos, cache) -> (logits, queries per layer)` to keep the queries the rule reads: the last
    `window` decode queries (seeded with the last prompt queries), or, for H2O, the queries since
    their attention mass was last added to each entry's total (every `every` steps and before each
    eviction: exact, since no entry a query saw leaves the cache before its mass is counted). H2O's
    schedule is each row's own (`pending`), and a row's mass is computed on that row's slice, so a
    row adds the same queries in the same order as when it decodes alone (the last bits can still
    differ where its entries sit at other columns than alone).
    A draft's tokens (LAQ's reuse) are fed in one forward without queries: they miss the ring.
    A server (serve.py) starts it with no prompt (`obs=None`) and seeds each slot's row with `admit`."""

    def __init__(self, cfg: lqc.EvictConfig, cache, *, limit: int, every: int, step, obs: lqc.Observation | None,
                 prompt_pos: list | None = None):
        self.cfg, self.limit, self.every, self.inner = cfg, limit, every, step
        if isinstance(cache, M.KVCache):
            cache.max_width = limit  # its appends allocate no room past the limit either
        self.needs_mass, self.needs_queries = cfg.entry.needs_mass, cfg.entry.needs_queries
        self.seconds, self.evictions = 0.0, 0
        self.mass = None
        self.queries = deque(maxlen=None if self.needs_mass else cfg.window)  # (per layer [B, H_q, 1, D], pos [B, 1])
        self.pending = [0] * cache.k[0].shape[0]  # H2O: per row, the newest entries of `queries` its mass lacks
        if obs is None:
            return
        if self.needs_mass:  # the prompt queries' mass, moved to the decode cache's layout
            self.mass = [lqc.carry(m, p, c) for m, p, c in zip(obs.mass, prompt_pos, cache.pos)]
        elif self.needs_queries:
            self.queries.extend(([q[:, :, t:t + 1] for q in obs.obs_q], obs.obs_pos[:, t:t + 1])
                                for t in range(obs.obs_pos.shape[1]))

    def step(self, tokens, pos, cache):
        logits, q = self.inner(tokens, pos, cache)
        if self.needs_mass or self.needs_queries:
            self.queries.append((q, pos))  # fresh tensors: make_step copies them out of a CUDA graph
        if self.needs_mass:
            self.pending = [p + 1 for p in self.pending]
        return logits, q

    def __call__(self, cache, n: int = 1):
        # [B]: a row is evicted when it is full, as alone (a finished row too: each round still
        # writes its n entries before rewinding them)
        full = cache.kept().amax(dim=(0, 2)) + n > self.limit
        rows = full.tolist()  # one device sync a round
        due = [r for r, (f, p) in enumerate(zip(rows, self.pending)) if f or p >= self.every] if self.needs_mass else []
        if any(rows) or due:
            sync(cache.k[0].device)
            t = time.perf_counter()
            if self.needs_mass:
                self.add_mass(cache, due)
            if any(rows):
                self.evict(cache, self.limit - max(self.every, n), rows=None if all(rows) else full)
            sync(cache.k[0].device)
            self.seconds += time.perf_counter() - t

    def admit(self, row: int, cache, obs: lqc.Observation, prompt_pos: list):
        """A new request in row `row` of `cache` (its prompt's cache already written there): its
        state becomes what it would be alone (its prompt's mass, or its last `window` prompt
        queries), and whatever the row's earlier occupant left is dropped. A query at position -1
        sees only empty slots, whose mass is zeroed (`lqc.attention_mass`): it stands for "no query"."""
        if self.needs_mass:
            if self.mass is None:
                self.mass = [p.new_zeros(p.shape, dtype=torch.float32) for p in cache.pos]
            for m, pm, pp, p in zip(self.mass, obs.mass, prompt_pos, cache.pos):
                m[row] = lqc.carry(pm, pp, p[row:row + 1])[0]
            self.pending[row] = 0  # the queries not yet added are the earlier occupant's
            self.trim()
        elif self.needs_queries:
            w, S = self.cfg.window, cache.k[0].shape[0]
            if len(self.queries) < w:  # a fresh server: the ring padded to its length with "no query" in every row
                none = ([q.new_zeros(S, q.shape[1], 1, q.shape[3]) for q in obs.obs_q], obs.obs_pos.new_full((S, 1), -1))
                self.queries.extendleft([none] * (w - len(self.queries)))
            n = obs.obs_pos.shape[1]  # the prompt's kept queries [1, H_q, n, D] per layer, at obs_pos [1, n]
            for i, (q, pos) in enumerate(self.queries):  # oldest first: the last min(n, w) take the prompt's last queries
                t = n - w + i  # the prompt query that lands in entry i (< 0: none)
                q, pos = [l.clone() for l in q], pos.clone()
                for l, pq in zip(q, obs.obs_q):
                    l[row] = pq[0, :, t:t + 1] if t >= 0 else 0
                pos[row] = obs.obs_pos[0, t] if t >= 0 else -1
                self.queries[i] = (q, pos)

    def stacked_queries(self):
        """The kept queries per layer `[B, H_q, w, D]` and their positions `[B, w]`."""
        qs, pos = zip(*self.queries)
        return [torch.cat(q, dim=2) for q in zip(*qs)], torch.cat(pos, dim=1)

    def add_mass(self, cache, rows: list):
        """Add the pending queries' attention mass of each row in `rows`, one row at a time (what
        `lqc.accumulate_mass` adds, on the row's slice)."""
        self.mass = [m if m.shape[-1] == k.shape[2] else F.pad(m, (0, k.shape[2] - m.shape[-1]))  # a readable cache grows
                     for m, k in zip(self.mass, cache.k)]
        for r in rows:
            entries = list(self.queries)[len(self.queries) - self.pending[r]:]
            if not entries:
                continue
            q = [torch.cat([e[0][l][r:r + 1] for e in entries], dim=2) for l in range(len(self.mass))]  # [1, H_q, n, D]
            q_pos = torch.cat([e[1][r:r + 1] for e in entries], dim=1)  # [1, n]
            for m, ql, k, p in zip(self.mass, q, cache.k, cache.pos):
                m[r:r + 1] += lqc.attention_mass(ql, k[r:r + 1], q_pos, p[r:r + 1])
            self.pending[r] = 0
        self.trim()

    def trim(self):
        """Drop the ring's entries that every row's mass has counted."""
        while len(self.queries) > max(self.pending, default=0):
            self.queries.popleft()

    def evict(self, cache, keep: int, rows: torch.Tensor | None = None):
        q, q_pos = self.stacked_queries() if self.needs_queries else (None, None)
        indices = lqc.plan_limit(self.cfg, keep, keys=cache.k, positions=cache.pos, queries=q, q_pos=q_pos,
                                 mass=self.mass, rows=rows)
        cache.compact(indices)
        if self.mass is not None:  # the kept entries' totals, padded to the cache's columns (a static cache keeps its width)
            self.mass = [F.pad(lqc.take(m, i, 0.0), (0, k.shape[2] - i.shape[-1]))
                         for m, i, k in zip(self.mass, indices, cache.k)]
        self.evictions += 1
