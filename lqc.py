"""lqc: KV-cache eviction after prefill (and during decoding, under a cache limit: `plan_limit`),
as small functions over tensors. Needs only torch:
copy this file alone into another project and run score -> select -> gather on your own tensors.

The chain, per layer (the cache is kept per KV head, keys post-RoPE, every entry with its
absolute position, -1 = empty slot):
  score_<policy>(...) -> scores [B, H_kv, L]                      higher = keep
  select(scores, budget, keep_last) -> indices [B, H_kv, K]       sorted per KV head
  gather(indices, k, v, pos) -> compacted k, v [B, H_kv, K, D], pos [B, H_kv, K]
Scores live at KV-head granularity: the query heads that share a KV head are summed, so the cache
is never repeated per query head (GQA). Positions are absolute: a query sees a key when the key's
position is <= its own (`visible`, the one place that rule is written), whatever column the key
sits in after earlier compaction.

Lookahead Q-Cache (LAQ, arXiv 2505.20334): decode a few greedy *pseudo* answer tokens on a
SnapKV-compressed copy of the cache (`lookahead`, over any step function you give it), and score
the prompt keys with the pseudo tokens' queries, which resemble the queries of the real answer
more than the prompt's own queries do.

`METHODS` is the table of policies: per method everything the rest of the project asks of it (its
prompt-time score, the positions it keeps anyway, its decode-time rule under a cache limit, what
prefill must keep for it, its budgets across layers and heads, its label and plot style). Adding a
method is one entry plus its score function; `plan_eviction` and `plan_limit` read the entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The visibility rule

def visible(k_pos: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Whether a query at absolute position q_pos sees a key at k_pos (broadcasting): the key's
    position is <= the query's. Position -1 marks an empty slot (left padding, or a KV head that
    keeps fewer entries than others); only a padding query (also -1) sees it, which keeps that
    query's softmax finite. The dense mask, FlexAttention's mask_mod and the scores all call this."""
    return (k_pos <= q_pos) & ((k_pos >= 0) | (q_pos < 0))


# ----------------------------------------------------------------------------------------------
# Scores

def attention_mass(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Softmax attention (fp32) that the queries pay to each key, summed over the queries and over
    the query heads sharing each KV head. Empty slots (k_pos -1) receive none, so padding never
    leaks into pooling or into a budget allocation.
    q `[B, H_q, T, D]`, k `[B, H_kv, L, D]`, q_pos `[B, T]`, k_pos `[B, H_kv, L]` -> `[B, H_kv, L]`."""
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query head h reads KV head h // G
    q, q_pos = q.to(k.device), q_pos.to(k.device)  # layers may live on different devices (device_map)
    qg = q.float().reshape(B, Hkv, G * T, D)
    logits = qg @ k.float().transpose(-1, -2) / math.sqrt(D)  # [B, H_kv, G*T, L]
    seen = visible(k_pos[:, :, None, :], q_pos[:, None, :, None])  # [B, H_kv, T, L]
    seen = seen[:, :, None].expand(B, Hkv, G, T, L).reshape(B, Hkv, G * T, L)
    probs = logits.masked_fill(~seen, float("-inf")).softmax(dim=-1).nan_to_num(0.0)  # a query seeing nothing adds nothing
    return probs.sum(dim=2).masked_fill(k_pos < 0, 0.0)


def pool_scores(scores: torch.Tensor, kernel: int = 7, kind: str = "max") -> torch.Tensor:
    """1-D pooling along positions, stride 1, same length: keeps the neighbours of an important
    key, so kept entries come in small runs (SnapKV's clustering). `[B, H, L]` -> `[B, H, L]`."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    if kind == "max":
        return F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    return F.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)


def _pool_before_window(scores, k_pos, window, kernel, kind):
    # the last `window` keys are kept anyway (select's keep_last) and take no part in pooling;
    # empty slots score -inf after pooling (a neighbour's pooled score would spill onto them)
    L = scores.shape[-1]
    window = min(window, L)
    head = pool_scores(scores[..., : L - window], kernel, kind)
    out = torch.cat([head, torch.full_like(scores[..., L - window:], float("inf"))], dim=-1)
    return out.masked_fill(k_pos < 0, float("-inf"))


def score_snapkv(q_obs, k, q_pos, k_pos, *, window=32, kernel=7, pool="max"):
    """SnapKV: attention from the last `window` prompt queries, pooled over the keys before the
    window; the window scores +inf, empty slots -inf. q_obs `[B, H_q, >=window, D]`, q_pos
    `[B, >=window]`, k `[B, H_kv, L, D]`, k_pos `[B, H_kv, L]` -> `[B, H_kv, L]`."""
    window = min(window, q_obs.shape[2])
    scores = attention_mass(q_obs[:, :, -window:], k, q_pos[:, -window:], k_pos)
    return _pool_before_window(scores, k_pos, window, kernel, pool)


def score_laq(pseudo_q, k, pseudo_pos, k_pos, *, suffix_q=None, suffix_pos=None, kernel=7, pool="max"):
    """Lookahead Q-Cache: attention from the pseudo tokens' queries `[B, H_q, n, D]` (positions
    `[B, n]`, after the prompt). LAQ++ also passes the last prompt queries `suffix_q` `[B, H_q, w, D]`
    (positions `[B, w]`); their w keys are then kept anyway and score +inf. -> `[B, H_kv, L]`."""
    q, pos, window = pseudo_q, pseudo_pos, 0
    if suffix_q is not None:
        q, pos, window = torch.cat([suffix_q, pseudo_q], 2), torch.cat([suffix_pos, pseudo_pos], 1), suffix_q.shape[2]
    return _pool_before_window(attention_mass(q, k, pos, k_pos), k_pos, window, kernel, pool)


def score_h2o(mass: torch.Tensor, k_pos: torch.Tensor, window: int = 32) -> torch.Tensor:
    """H2O heavy hitters: the attention mass each key received from all prompt queries (see
    `accumulate_mass`), plus a recent window that scores +inf. mass, k_pos `[B, H_kv, L]` -> same."""
    return _pool_before_window(mass, k_pos, window, 1, "max")


def accumulate_mass(mass: torch.Tensor | None, q, k, q_pos, k_pos) -> torch.Tensor:
    """Add the attention mass of one prefill chunk of queries to the running H2O totals. Chunking
    over queries is exact (each query's softmax spans every key it can see, all already in the
    cache) and never holds an L x L matrix. mass `[B, H_kv, L_prev]` -> `[B, H_kv, L]`."""
    new = attention_mass(q, k, q_pos, k_pos)
    return new if mass is None else new + F.pad(mass, (0, new.shape[-1] - mass.shape[-1]))


def score_streaming(k_pos: torch.Tensor, sinks: int = 4) -> torch.Tensor:
    """StreamingLLM: the first `sinks` positions (attention sinks) score above the rest, earliest
    highest, empty slots -inf; keep the recent ones with select's keep_last = budget - sinks.
    `[B, H_kv, L]` -> same."""
    return (sinks - k_pos).clamp(min=0).float().masked_fill(k_pos < 0, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Select and gather: the one place that turns scores into kept indices, and applies them

def select(scores: torch.Tensor, budget, keep_last: int = 0) -> torch.Tensor:
    """Per KV head, the last `keep_last` positions plus the top (budget - keep_last) of the rest;
    sorted, unique. `budget` is an int or a `[B, H_kv]` tensor (ragged heads); a head keeping fewer
    than the widest is padded at the end with index L (an empty slot after gather).
    scores `[B, H_kv, L]` -> indices `[B, H_kv, K]`, K = max budget (capped at L)."""
    B, H, L = scores.shape
    budget = torch.as_tensor(budget, device=scores.device).expand(B, H).clamp(max=L)  # [B, H]
    keep_last = min(keep_last, int(budget.min()))
    n_top = budget - keep_last  # [B, H]
    k_max = int(n_top.max())
    # a stable sort, not topk: ties (max-pooling makes many) go to the earlier position, so the
    # choice does not depend on where a row sits in a padded batch
    top = scores[..., : L - keep_last].sort(dim=-1, descending=True, stable=True).indices[..., :k_max]  # [B, H, k_max]
    rank = torch.arange(k_max, device=scores.device)
    top = torch.where(rank < n_top[..., None], top, L)
    last = torch.arange(L - keep_last, L, device=scores.device).expand(B, H, keep_last)
    return torch.cat([top, last], dim=-1).sort(dim=-1).values


def gather(indices: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
    """The kept entries of one layer: indices `[B, H_kv, K]` (from `select`; index S pads a head
    that keeps fewer), k, v `[B, H_kv, S, D]`, pos `[B, H_kv, S]` -> k, v `[B, H_kv, K, D]` and
    pos `[B, H_kv, K]`, where padding indices become empty slots (position -1)."""
    safe = indices.clamp(max=k.shape[2] - 1)[..., None].expand(-1, -1, -1, k.shape[-1])  # [B, H_kv, K, D]
    return k.gather(2, safe), v.gather(2, safe), take(pos, indices, -1)


def take(values: torch.Tensor, indices: torch.Tensor, fill) -> torch.Tensor:
    """Per-entry values `[B, H_kv, S]` (positions, H2O's mass) of the kept entries `[B, H_kv, K]`;
    a padding index (S) reads `fill`."""
    S = values.shape[-1]
    return torch.where(indices < S, values.gather(-1, indices.clamp(max=S - 1)), fill)


# ----------------------------------------------------------------------------------------------
# Bounded memory: eviction during decoding
#
# With a cache limit, decoding evicts too: when the cache is full, every entry (prompt and
# generated) is scored with the queries the method has by then and the cache shrinks to `keep`
# entries per KV head. A cache that grew after a ragged eviction has empty slots between its kept
# and its new entries, so the rules below go by position, never by column: valid entries sit in
# position order in every cache (appends are in order, gather keeps order).

def keep_recent(scores: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """The `window` newest positions of each row score +inf (kept anyway), empty slots -inf.
    scores, k_pos `[B, H_kv, S]` -> `[B, H_kv, S]`."""
    newest = k_pos.amax(-1, keepdim=True)  # [B, H_kv, 1]
    return scores.masked_fill(k_pos > newest - window, float("inf")).masked_fill(k_pos < 0, float("-inf"))


def pool_valid(scores: torch.Tensor, k_pos: torch.Tensor, kernel: int = 7, kind: str = "max") -> torch.Tensor:
    """`pool_scores` over the valid entries in position order, wherever their columns are: an empty
    slot is no neighbour, so a cache with holes pools like one whose entries fill a prefix."""
    order = (k_pos < 0).to(torch.int8).argsort(dim=-1, stable=True)  # [B, H_kv, S] valid entries first
    return torch.empty_like(scores).scatter_(-1, order, pool_scores(scores.gather(-1, order), kernel, kind))


def score_limit(cfg: "EvictConfig", k, k_pos, keep: int, *, q=None, q_pos=None, mass=None) -> torch.Tensor:
    """Decode-time scores of every cached entry of one layer, for a cache shrinking to `keep`
    entries per KV head (see `plan_limit`): the method's `limit_scores`. k `[B, H_kv, S, D]`,
    k_pos `[B, H_kv, S]`; q `[B, H_q, w, D]` at q_pos `[B, w]`: the last decode queries; mass
    `[B, H_kv, S]`: H2O's totals. -> `[B, H_kv, S]`."""
    return METHODS[cfg.method].limit_scores(cfg, k, k_pos, keep, q=q, q_pos=q_pos, mass=mass)


def limit_streaming(cfg, k, k_pos, keep, *, q=None, q_pos=None, mass=None):
    """The sinks and the newest keep - sinks positions."""
    sinks = min(cfg.sinks, keep)
    return keep_recent(score_streaming(k_pos, sinks), k_pos, keep - sinks)


def limit_h2o(cfg, k, k_pos, keep, *, q=None, q_pos=None, mass=None):
    """The `window` newest plus the heaviest others by the mass accumulated over prompt and decode queries."""
    return keep_recent(mass, k_pos, min(cfg.window, keep))


def limit_attention(cfg, k, k_pos, keep, *, q=None, q_pos=None, mass=None):
    """The `window` newest plus the others that the last decode queries attend to most, pooled."""
    scores = pool_valid(attention_mass(q, k, q_pos, k_pos), k_pos, cfg.kernel, cfg.pool)
    return keep_recent(scores, k_pos, min(cfg.window, keep))


def plan_limit(cfg: "EvictConfig", keep: int, *, keys: list, positions: list, queries: list | None = None,
               q_pos: torch.Tensor | None = None, mass: list | None = None, rows: torch.Tensor | None = None) -> list:
    """Kept indices per layer `[B, H_kv, keep]` (sorted; for `gather`) when a full cache must shrink
    to `keep` entries per KV head during decoding, by the method's `limit_scores` (the table's
    entry): StreamingLLM keeps sinks and the newest entries; H2O the newest and the heaviest by
    the attention mass accumulated over prompt and decode queries (`accumulate_mass`), as H2O
    does; the SnapKV family and LAQ the newest and those the last decode queries `[B, H_q, w, D]`
    (per layer, at q_pos `[B, w]`) attend to most, pooled. The real answer's queries are what
    LAQ's pseudo queries stood in for; PyramidKV's and Ada-KV's shares shaped the prompt's budget,
    the limit is the same for every head.
    keys / positions: the cache per layer `[B, H_kv, S, D]` / `[B, H_kv, S]`. rows `[B]` (bool): only
    these rows shrink; the others keep every entry, as they would alone (a batch evicts a row when
    that row is full, not when the fullest row is)."""
    n = len(keys)
    queries, mass = queries or [None] * n, mass or [None] * n
    out = []
    for k, p, q, m in zip(keys, positions, queries, mass):
        scores, budget = score_limit(cfg, k, p, keep, q=q, q_pos=q_pos, mass=m), keep
        if rows is not None:
            valid = p >= 0  # [B, H_kv, S]
            everything = torch.zeros_like(scores).masked_fill(~valid, float("-inf"))
            scores = torch.where(rows[:, None, None], scores, everything)
            budget = torch.where(rows[:, None], keep, valid.sum(-1))  # [B, H_kv]
        out.append(select(scores, budget))
    return out


def carry(values: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor) -> torch.Tensor:
    """Per-entry values `[B, H_kv, S]` of the entries at from_pos `[B, H_kv, S]`, read for the same
    entries laid out at to_pos `[B, H_kv, S']` (a compacted or packed cache; every valid position
    of to_pos is in from_pos). Empty slots read 0."""
    table = values.new_zeros(*values.shape[:2], int(from_pos.max()) + 2)  # [B, H_kv, P + 1]; 0 collects empty slots
    table.scatter_(-1, from_pos + 1, values)
    return table.gather(-1, to_pos + 1).masked_fill(to_pos < 0, 0)


# ----------------------------------------------------------------------------------------------
# Budget allocation across layers and heads

def budgets_pyramid(n_layers: int, budget: int, window: int, beta: float = 20) -> list[int]:
    """PyramidKV: the per-layer budget beyond the window shrinks linearly with depth, from
    2*(budget - window) - m down to m = (budget - window) / beta; the total equals uniform's."""
    rest = budget - window
    if n_layers == 1 or rest <= 0:
        return [budget] * n_layers
    lo = rest / beta
    hi = 2 * rest - lo
    raw = [hi - (hi - lo) * l / (n_layers - 1) for l in range(n_layers)]
    out = [int(r) for r in raw]
    # hand the rounding remainder to the layers that lost most, so the total is exact
    for l in sorted(range(n_layers), key=lambda l: out[l] - raw[l])[: n_layers * rest - sum(out)]:
        out[l] += 1
    return [o + window for o in out]


def budgets_adakv(scores: torch.Tensor, budget: int, keep_last: int, alpha: float = 0.2) -> torch.Tensor:
    """Ada-KV: one top-k over all KV heads of a layer decides each head's share of the layer's
    H * budget entries; each head keeps at least its window plus alpha * (budget - window).
    scores `[B, H_kv, L]` (the window scoring +inf, empty slots -inf) -> budgets `[B, H_kv]`,
    summing to H * budget."""
    B, H, L = scores.shape
    keep_last = min(keep_last, budget)
    rest = budget - keep_last
    prefix = scores[..., : L - keep_last]  # [B, H, P]
    P = prefix.shape[-1]
    if P <= rest:
        return torch.full((B, H), budget, device=scores.device)
    floor = int(alpha * rest)
    beyond = prefix.sort(dim=-1, descending=True).values[..., floor:]  # [B, H, P - floor]
    n_extra = H * (rest - floor)
    # stable: ties go to the lower head and rank, whatever padding the row carries (-inf, sorted last)
    winners = beyond.reshape(B, -1).sort(dim=-1, descending=True, stable=True).indices[:, :n_extra] // (P - floor)
    extra = torch.zeros(B, H, dtype=torch.long, device=scores.device).scatter_add_(1, winners, torch.ones_like(winners))
    return floor + extra + keep_last


# ----------------------------------------------------------------------------------------------
# The lookahead: LAQ's pseudo decoding over any model and cache

Step = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, list[torch.Tensor]]"]


@torch.no_grad()
def lookahead(step: Step, logits: torch.Tensor, next_pos: torch.Tensor, n: int, eos_ids=()):
    """Greedily decode up to n pseudo tokens and record their queries (LAQ's Q-Cache).
    `step(tokens [B, 1], pos [B, 1]) -> (logits [B, V], queries)`, queries being each layer's
    post-RoPE queries `[B, H_q, 1, D]`; the step appends to a cache the caller owns (a compressed
    copy: the real cache is not touched). The first pseudo token is the argmax of `logits` `[B, V]`
    (the prefill logits), at position next_pos `[B]`; then next_pos + 1, ... The lookahead stops at
    EOS: once every row has reached it, nothing more is fed. In a batch, a row that reached EOS
    before the others is still stepped with the rest (one batched step for all rows), but the
    queries of its later steps get position -1 (a query that sees nothing, scoring nothing) and
    its entries land only in the caller's scratch cache; its first token is always fed, so every
    row has a query.
    Returns each layer's queries `[B, H_q, n', D]`, their positions `[B, n']`, n' <= n, and the
    pseudo tokens `[B, n' + 1]`: the n' fed ones and the greedy choice after the last, a draft that
    speculative decoding can check (a row's tokens after its EOS mean nothing)."""
    tok = logits.argmax(-1)  # [B]
    eos = torch.tensor(list(eos_ids), dtype=tok.dtype, device=tok.device)
    done = torch.zeros_like(tok, dtype=torch.bool)  # [B]
    queries, positions, tokens = [], [], [tok]
    for i in range(n):
        pos = (next_pos + i)[:, None]  # [B, 1]
        step_logits, q = step(tok[:, None], pos)
        queries.append(q)
        positions.append(torch.where(done[:, None], -1, pos))
        nxt = step_logits.argmax(-1)
        tokens.append(nxt)
        done |= torch.isin(tok, eos) | torch.isin(nxt, eos)
        tok = nxt
        if done.all():
            break
    return [torch.cat(qs, dim=2) for qs in zip(*queries)], torch.cat(positions, dim=1), torch.stack(tokens, dim=1)


# ----------------------------------------------------------------------------------------------
# The methods: each one entry of METHODS (a `Method`) plus its score function; the rest of lqc and
# of the project reads the entry and never compares method names

MAX_POOL_KERNEL = 255  # pooling spreads a key's score over this many neighbours; more is no longer local


@dataclass(kw_only=True)
class EvictConfig:
    method: str = "laqpp"
    budget: int = 256  # kept prompt entries per KV head per layer (the average, for pyramidkv / adakv)
    window: int = 32  # observation window of SnapKV / PyramidKV / Ada-KV / LAQ's SnapKV copy, recent window of H2O
    window_laqpp: int = 8  # prompt-suffix queries (and kept keys) of LAQ++
    lookahead: int = 8  # pseudo tokens of LAQ
    kernel: int = 7
    pool: str = "max"
    sinks: int = 4  # StreamingLLM
    beta: float = 20  # PyramidKV
    alpha: float = 0.2  # Ada-KV floor
    cap: int | None = None  # at most this many kept entries per KV head (a cache limit): PyramidKV's and
    # Ada-KV's wider layers and heads are cut to it, so the cache's capacity is the limit

    def __post_init__(self):
        """Every range, checked here only (the command lines turn these errors into flag names)."""
        if self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(method_names())}")
        if not self.budget > 0:
            raise ValueError(f"budget must be > 0 (got {self.budget})")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool must be max or avg (got {self.pool!r})")
        # window_laqpp 0 would be LAQ: a method of its own
        if self.cap is not None and not self.cap >= self.budget:
            raise ValueError(f"cap must be >= budget (got {self.cap} and {self.budget})")
        for name, low in (("window", 1), ("window_laqpp", 1), ("lookahead", 1), ("sinks", 0)):
            if not getattr(self, name) >= low:
                raise ValueError(f"{name} must be >= {low} (got {getattr(self, name)})")
        if not (1 <= self.kernel <= MAX_POOL_KERNEL and self.kernel % 2 == 1):
            raise ValueError(f"kernel must be odd, so pooling keeps the length, from 1 to {MAX_POOL_KERNEL} "
                             f"(got {self.kernel}); 1 = no pooling")

    @property
    def entry(self) -> "Method | None":
        """The method's table entry; None for the full cache."""
        return METHODS.get(self.method)

    @property
    def looks_ahead(self) -> bool:
        """The method decodes pseudo tokens before it evicts (LAQ)."""
        return self.entry is not None and self.entry.lookahead

    @property
    def needs_mass(self) -> bool:
        """Prefill (and decoding, under a limit) accumulates H2O's attention mass of every query."""
        return self.entry is not None and self.entry.needs_mass

    @property
    def obs_window(self) -> int:
        """How many trailing prompt queries the policy needs from prefill."""
        return 0 if self.entry is None else self.entry.query_window(self)


@dataclass
class Observation:
    """What prefill hands to eviction besides the cache."""
    logits: torch.Tensor  # [B, V] the last prompt token's logits (the lookahead starts from them)
    next_pos: torch.Tensor  # [B] the first position after each prompt
    obs_q: list | None = None  # per layer, the last prompt queries [B, H_q, w, D] (SnapKV family, LAQ)
    obs_pos: torch.Tensor | None = None  # [B, w]
    mass: list | None = None  # per layer, H2O's accumulated attention [B, H_kv, L]


# Prompt-time scores: (cfg, obs, keys, positions) -> per layer [B, H_kv, L], empty slots -inf

def scores_streaming(cfg, obs, keys, positions):
    return [score_streaming(p, cfg.sinks) for p in positions]


def scores_h2o(cfg, obs, keys, positions):
    return [score_h2o(m, p, cfg.window) for m, p in zip(obs.mass, positions)]


def scores_snapkv(cfg, obs, keys, positions):
    return [score_snapkv(q, k, obs.obs_pos, p, window=cfg.window, kernel=cfg.kernel, pool=cfg.pool)
            for q, k, p in zip(obs.obs_q, keys, positions)]


# Budgets across layers and heads: (cfg, scores per layer, keep_last) -> per layer an int or [B, H_kv]

def allocate_uniform(cfg, scores, keep_last):
    return [cfg.budget] * len(scores)


def allocate_pyramid(cfg, scores, keep_last):
    return budgets_pyramid(len(scores), cfg.budget, keep_last, cfg.beta)


def allocate_adakv(cfg, scores, keep_last):
    return [budgets_adakv(s, cfg.budget, keep_last, cfg.alpha) for s in scores]


@dataclass(frozen=True)
class Method:
    """Everything the project asks of a method."""
    label: str  # in tables and figure legends
    scores: Callable  # prompt-time scores (see scores_*); with `lookahead`, those of LAQ's SnapKV copy
    keep_last: Callable[[EvictConfig], int]  # trailing prompt positions kept anyway
    limit_scores: Callable  # decode-time scores under a cache limit (see limit_*)
    allocate: Callable = allocate_uniform  # the budget across layers and heads (see allocate_*)
    lookahead: bool = False  # rescore with the queries of pseudo tokens decoded on the SnapKV copy (LAQ)
    needs_mass: bool = False  # prefill and decoding accumulate the attention mass of every query (H2O)
    needs_queries: bool = False  # the decode-time rule reads the last `window` decode queries
    query_window: Callable[[EvictConfig], int] = lambda c: 0  # trailing prompt queries prefill keeps
    windows: tuple = ()  # EvictConfig fields that are part of the budget: clamped to it (the window rule)
    # the most prompt entries one KV head keeps, given (cfg, n_layers): sizes a fixed-capacity slot
    # (serve.py). Ada-KV's widest head depends on the prompt: a slot cuts it to the budget (cfg.cap)
    widest: Callable[[EvictConfig, int], int] = lambda c, n_layers: c.budget
    style: tuple = ("tab:gray", "o", "-")  # color, marker, line style in figures


_SNAP = dict(scores=scores_snapkv, keep_last=lambda c: c.window, limit_scores=limit_attention, needs_queries=True,
             query_window=lambda c: c.window, windows=("window",))
METHODS = {  # "full" evicts nothing and has no entry
    "streaming": Method(label="StreamingLLM", scores=scores_streaming, limit_scores=limit_streaming,
                        keep_last=lambda c: c.budget - min(c.sinks, c.budget), style=("tab:gray", "v", ":")),
    "h2o": Method(label="H2O", scores=scores_h2o, keep_last=lambda c: c.window, limit_scores=limit_h2o,
                  needs_mass=True, windows=("window",), style=("tab:brown", "^", ":")),
    "snapkv": Method(label="SnapKV", **_SNAP, style=("tab:blue", "s", "-.")),
    "pyramidkv": Method(label="PyramidKV", **_SNAP, allocate=allocate_pyramid, style=("tab:cyan", "D", "-."),
                        widest=lambda c, n_layers: max(budgets_pyramid(n_layers, c.budget, c.window, c.beta))),
    "adakv": Method(label="Ada-KV", **_SNAP, allocate=allocate_adakv, style=("tab:purple", "P", "-.")),
    "laq": Method(label="LAQ", **_SNAP | dict(keep_last=lambda c: 0), lookahead=True, style=("tab:orange", "o", "-")),
    "laqpp": Method(label="LAQ++", **_SNAP | dict(keep_last=lambda c: c.window_laqpp,
                                                  query_window=lambda c: max(c.window, c.window_laqpp),
                                                  windows=("window", "window_laqpp")),
                    lookahead=True, style=("tab:red", "*", "-")),
}


def method_names() -> tuple:
    """Every name --method takes: "full" (no eviction) and the table's methods, read when asked, so
    an entry added to METHODS is a method everywhere."""
    return ("full", *METHODS)


def plan_eviction(cfg: EvictConfig, obs: Observation, *, keys: list, positions: list,
                  lookahead_step: Callable[[list], Step] | None = None, eos_ids=(),
                  on_pseudo: Callable[[torch.Tensor], None] | None = None) -> list | None:
    """Kept indices per layer (a list of `[B, H_kv, K]`, for `gather`), or None when nothing is
    evicted. keys / positions: the prompt cache per layer, `[B, H_kv, L, D]` / `[B, H_kv, L]`.
    lookahead_step (LAQ only): given the SnapKV copy's kept indices per layer, return a `Step` over
    a cache compacted to them (see `lookahead`). on_pseudo (LAQ only): called with the lookahead's
    pseudo tokens `[B, n + 1]`, to reuse them as a draft. Rows of a batch may be left-padded
    (position -1): each row is evicted as if it were alone, and a row no longer than the budget
    keeps everything."""
    if cfg.method == "full" or keys[0].shape[2] <= cfg.budget:
        return None
    method = METHODS[cfg.method]
    keep_last = method.keep_last(cfg)
    scores = method.scores(cfg, obs, keys, positions)
    if method.lookahead:
        scores = lookahead_scores(cfg, obs, keys, positions, scores, lookahead_step, eos_ids, on_pseudo)
    budgets = method.allocate(cfg, scores, keep_last)
    if cfg.cap is not None:
        budgets = [torch.as_tensor(b).clamp(max=cfg.cap) for b in budgets]
    indices = [select(s, b, keep_last) for s, b in zip(scores, budgets)]
    return keep_short_rows(indices, positions[0], cfg.budget)


def lookahead_scores(cfg, obs, keys, positions, snap_scores, lookahead_step, eos_ids, on_pseudo=None) -> list:
    """LAQ: pseudo tokens decoded on a SnapKV copy of the cache at the same budget score the keys;
    LAQ++ adds the last keep_last prompt queries. -> per layer `[B, H_kv, L]`."""
    snap_kept = [select(s, cfg.budget, cfg.window) for s in snap_scores]
    pseudo_q, pseudo_pos, pseudo_tokens = lookahead(lookahead_step(snap_kept), obs.logits, obs.next_pos,
                                                    cfg.lookahead, eos_ids)
    if on_pseudo is not None:
        on_pseudo(pseudo_tokens)
    w2 = METHODS[cfg.method].keep_last(cfg)
    suffix = [(q[:, :, -w2:], obs.obs_pos[:, -w2:]) if w2 else (None, None) for q in obs.obs_q]
    return [score_laq(pq, k, pseudo_pos, p, suffix_q=sq, suffix_pos=sp, kernel=cfg.kernel, pool=cfg.pool)
            for pq, k, p, (sq, sp) in zip(pseudo_q, keys, positions, suffix)]


def keep_short_rows(indices: list, pos: torch.Tensor, budget: int) -> list:
    """A row no longer than the budget keeps every entry, as it would alone (nothing is evicted
    then), even in a layer whose own budget is smaller (PyramidKV). pos `[B, H_kv, L]`: the prompt
    cache's positions (all heads alike). Other rows get padding indices where the layer widens."""
    valid = pos[:, 0] >= 0  # [B, L]
    short = valid.sum(-1) <= budget  # [B]
    if not short.any():
        return indices
    L = valid.shape[-1]
    every = torch.where(valid, torch.arange(L, device=valid.device), L).sort(-1).values  # [B, L] valid first
    width = int(valid[short].sum(-1).max())
    out = []
    for idx in indices:
        K = max(idx.shape[-1], width)
        idx = F.pad(idx, (0, K - idx.shape[-1]), value=L)
        idx[short] = every[short, None, :K]
        out.append(idx)
    return out
