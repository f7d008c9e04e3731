"""lqc: KV-cache eviction after prefill, as small functions over tensors.

Every policy is a score function -> one shared `select` -> one shared gather (`KVCache.gather`):
  score_<policy>(...) -> scores [B, H_kv, L]     higher = keep
  select(scores, budget, keep_last) -> indices [B, H_kv, K]   sorted per KV head
Scores live at KV-head granularity: the query heads that share a KV head are summed, so the cache
is never repeated per query head (GQA). Positions are absolute: a query sees a key when the key's
position is <= its own, whatever column the key sits in after earlier compaction.

Lookahead Q-Cache (LAQ, arXiv 2505.20334): decode a few greedy *pseudo* answer tokens on a
SnapKV-compressed copy of the cache, and score the prompt keys with the pseudo tokens' queries,
which resemble the queries of the real answer more than the prompt's own queries do.

The score functions, `select` and `budgets_*` need only torch: paste them anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("full", "streaming", "h2o", "snapkv", "pyramidkv", "adakv", "laq", "laqpp")


# ----------------------------------------------------------------------------------------------
# Scores

def attention_mass(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Softmax attention (fp32) that the queries pay to each key, summed over the queries and over
    the query heads sharing each KV head. A query sees the keys at positions <= its own (k_pos -1
    marks an empty slot).
    q `[B, H_q, T, D]`, k `[B, H_kv, L, D]`, q_pos `[B, T]`, k_pos `[B, H_kv, L]` -> `[B, H_kv, L]`."""
    B, Hq, T, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query head h reads KV head h // G
    q, q_pos = q.to(k.device), q_pos.to(k.device)  # layers may live on different devices (device_map)
    qg = q.float().reshape(B, Hkv, G * T, D)
    logits = qg @ k.float().transpose(-1, -2) / math.sqrt(D)  # [B, H_kv, G*T, L]
    kp = k_pos[:, :, None, :]  # [B, H_kv, 1, L]
    visible = (kp >= 0) & (kp <= q_pos[:, None, :, None])  # [B, H_kv, T, L]
    visible = visible[:, :, None].expand(B, Hkv, G, T, L).reshape(B, Hkv, G * T, L)
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return probs.nan_to_num(0.0).sum(dim=2)  # a query that sees nothing (padding) adds nothing


def pool_scores(scores: torch.Tensor, kernel: int = 7, kind: str = "max") -> torch.Tensor:
    """1-D pooling along positions, stride 1, same length: keeps the neighbours of an important
    key, so kept entries come in small runs (SnapKV's clustering). `[B, H, L]` -> `[B, H, L]`."""
    if kernel <= 1:
        return scores
    if kind == "max":
        return F.max_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    return F.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)


def _pool_before_window(scores, window, kernel, kind):
    # the last `window` keys are kept anyway (select's keep_last) and take no part in pooling
    L = scores.shape[-1]
    head = pool_scores(scores[..., : L - window], kernel, kind)
    return torch.cat([head, torch.full_like(scores[..., L - window:], float("inf"))], dim=-1)


def score_snapkv(q_obs, k, q_pos, k_pos, window=32, kernel=7, pool="max"):
    """SnapKV: attention from the last `window` prompt queries, pooled over the keys before the
    window; the window scores +inf. q_obs `[B, H_q, >=window, D]`, q_pos `[B, >=window]`,
    k `[B, H_kv, L, D]`, k_pos `[B, H_kv, L]` -> `[B, H_kv, L]`."""
    window = min(window, q_obs.shape[2])
    scores = attention_mass(q_obs[:, :, -window:], k, q_pos[:, -window:], k_pos)
    return _pool_before_window(scores, window, kernel, pool)


def score_laq(pseudo_q, k, pseudo_pos, k_pos, suffix_q=None, suffix_pos=None, kernel=7, pool="max"):
    """Lookahead Q-Cache: attention from the pseudo tokens' queries `[B, H_q, n, D]` (positions
    `[B, n]`, after the prompt). LAQ++ also passes the last prompt queries `suffix_q` `[B, H_q, w, D]`
    (positions `[B, w]`); their w keys are then kept anyway and score +inf. -> `[B, H_kv, L]`."""
    q, pos, window = pseudo_q, pseudo_pos, 0
    if suffix_q is not None:
        q, pos, window = torch.cat([suffix_q, pseudo_q], 2), torch.cat([suffix_pos, pseudo_pos], 1), suffix_q.shape[2]
    return _pool_before_window(attention_mass(q, k, pos, k_pos), window, kernel, pool)


def score_h2o(mass: torch.Tensor, window: int = 32) -> torch.Tensor:
    """H2O heavy hitters: the attention mass each key received from all prompt queries (see
    `accumulate_mass`), plus a recent window that scores +inf. `[B, H_kv, L]` -> `[B, H_kv, L]`."""
    return _pool_before_window(mass, min(window, mass.shape[-1]), 1, "max")


def accumulate_mass(mass: torch.Tensor | None, q, k, q_pos, k_pos) -> torch.Tensor:
    """Add the attention mass of one prefill chunk of queries to the running H2O totals. Chunking
    over queries is exact (each query's softmax spans every key it can see, all already in the
    cache) and never holds an L x L matrix. mass `[B, H_kv, L_prev]` -> `[B, H_kv, L]`."""
    new = attention_mass(q, k, q_pos, k_pos)
    return new if mass is None else new + F.pad(mass, (0, new.shape[-1] - mass.shape[-1]))


def score_streaming(k_pos: torch.Tensor, sinks: int = 4) -> torch.Tensor:
    """StreamingLLM: the first `sinks` positions (attention sinks) score above the rest, earliest
    highest; keep the recent ones with select's keep_last = budget - sinks. `[B, H_kv, L]` -> same."""
    return (sinks - k_pos).clamp(min=0).float()


# ----------------------------------------------------------------------------------------------
# Select: the one place that turns scores into kept indices

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
    scores `[B, H_kv, L]` (the window scoring +inf) -> budgets `[B, H_kv]`, summing to H * budget."""
    B, H, L = scores.shape
    keep_last = min(keep_last, budget)
    rest = budget - keep_last
    prefix = scores[..., : L - keep_last]  # [B, H, P]
    P = prefix.shape[-1]
    if P <= rest:
        return torch.full((B, H), budget, device=scores.device)
    floor = int(alpha * rest)
    beyond = prefix.sort(dim=-1, descending=True).values[..., floor:]  # [B, H, P - floor]
    n_extra = min(H * (rest - floor), H * (P - floor))
    winners = beyond.reshape(B, -1).topk(n_extra, dim=-1).indices // (P - floor)  # [B, n_extra] head ids
    extra = torch.zeros(B, H, dtype=torch.long, device=scores.device).scatter_add_(1, winners, torch.ones_like(winners))
    return floor + extra + keep_last


# ----------------------------------------------------------------------------------------------
# The lookahead and the policies

@dataclass
class EvictConfig:
    method: str = "laqpp"
    budget: int = 256  # kept prompt entries per KV head per layer (the average, for pyramidkv / adakv)
    window: int = 32  # observation window of SnapKV / PyramidKV / Ada-KV, recent window of H2O
    window_laqpp: int = 8  # prompt-suffix queries (and kept keys) of LAQ++
    lookahead: int = 8  # pseudo tokens of LAQ
    kernel: int = 7
    pool: str = "max"
    sinks: int = 4  # StreamingLLM
    beta: float = 20  # PyramidKV
    alpha: float = 0.2  # Ada-KV floor

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.budget <= 0:
            raise ValueError(f"budget must be > 0 (got {self.budget})")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool must be max or avg (got {self.pool!r})")
        for name, low in (("window", 1), ("window_laqpp", 0), ("lookahead", 1), ("kernel", 1), ("sinks", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low} (got {getattr(self, name)})")
        if self.kernel % 2 == 0:
            raise ValueError(f"pool kernel must be odd, so pooling keeps the length (got {self.kernel})")

    @property
    def obs_window(self) -> int:
        """How many trailing prompt queries the policy needs from prefill."""
        return {"snapkv": self.window, "pyramidkv": self.window, "adakv": self.window,
                "laq": self.window, "laqpp": max(self.window, self.window_laqpp)}.get(self.method, 0)


@torch.no_grad()
def lookahead_queries(model, cache, prompt_logits, snap_indices, next_pos, n, eos_ids=()):
    """LAQ's lookahead: greedily decode up to n pseudo tokens on a SnapKV-compressed *copy* of the
    cache (the full cache is not touched), at their true positions next_pos, next_pos + 1, ...,
    stopping at EOS. The first is the argmax of the prefill logits `[B, V]`. Returns each layer's
    post-RoPE queries of the pseudo tokens `[B, H_q, n', D]` and their positions `[B, n']`; in a
    batch, a row that reached EOS while others go on gets position -1 (a query that sees nothing)."""
    scratch = cache.gather(snap_indices)
    tok = prompt_logits.argmax(-1)  # [B]
    eos = torch.tensor(list(eos_ids), dtype=tok.dtype, device=tok.device)
    done = torch.zeros_like(tok, dtype=torch.bool)  # [B]
    queries, positions = [], []
    for i in range(n):
        pos = (next_pos + i)[:, None]  # [B, 1]
        logits, q = model(tok[:, None], pos, scratch, return_queries=True)
        queries.append(q)
        positions.append(torch.where(done[:, None], -1, pos))
        tok = logits[:, -1].argmax(-1)
        done |= torch.isin(tok, eos)
        if done.all():
            break
    return [torch.cat(qs, dim=2) for qs in zip(*queries)], torch.cat(positions, dim=1)


def map_layers(fn, fused: bool, *per_layer):
    """fn applied to every layer: a readable loop, or (fused) one call with the layers stacked
    along the batch axis, which turns n_layers small kernels into one large one. Same result."""
    if not fused:
        return [fn(*args) for args in zip(*per_layer)]
    return list(fn(*[torch.cat(x, dim=0) for x in per_layer]).chunk(len(per_layer[0]), dim=0))


def plan_eviction(cfg: EvictConfig, model, cache, prompt_logits, obs_q, obs_pos, mass, next_pos, eos_ids=(), fused=False):
    """Kept indices per layer (a list of `[B, H_kv, K]`), or None when nothing is evicted.
    obs_q: the last prompt queries per layer `[B, H_q, w, D]` at obs_pos `[B, w]`; mass: H2O's
    accumulated attention per layer `[B, H_kv, L]`; next_pos `[B]`: the first position after the prompt.
    Rows of a batch may be left-padded (padding has position -1): each row is evicted as if it were
    alone, and a row no longer than the budget keeps everything.
    fused: score and select all layers at once (the fast path); the kept indices are the same."""
    if cfg.method == "full" or cache.length <= cfg.budget:
        return None
    indices = _score_and_select(cfg, model, cache, prompt_logits, obs_q, obs_pos, mass, next_pos, eos_ids, fused)
    valid = cache.pos[0][:, 0] >= 0  # [B, L]
    short = valid.sum(-1) <= cfg.budget  # [B]
    if short.any():
        L = valid.shape[-1]
        every = torch.where(valid, torch.arange(L, device=valid.device), L).sort(-1).values  # [B, L] valid first
        for idx in indices:
            K = min(idx.shape[-1], L)
            idx[short] = L
            idx[short, :, :K] = every[short, None, :K]
    return indices


def _score_and_select(cfg, model, cache, prompt_logits, obs_q, obs_pos, mass, next_pos, eos_ids, fused):
    n = len(cache.k)
    b, w, kernel, pool = cfg.budget, cfg.window, cfg.kernel, cfg.pool
    obs_pos = [obs_pos] * n

    def each(fn, *per_layer):
        return map_layers(fn, fused, *per_layer)

    def pick(scores, k_pos, budget, keep_last):
        return select(scores.masked_fill(k_pos < 0, float("-inf")), budget, keep_last)

    if cfg.method == "streaming":
        return each(lambda p: pick(score_streaming(p, cfg.sinks), p, b, b - min(cfg.sinks, b)), cache.pos)
    if cfg.method == "h2o":
        return each(lambda m, p: pick(score_h2o(m, w), p, b, w), mass, cache.pos)
    snap = each(lambda q, k, qp, kp: score_snapkv(q, k, qp, kp, w, kernel, pool), obs_q, cache.k, obs_pos, cache.pos)
    if cfg.method == "snapkv":
        return each(lambda s, p: pick(s, p, b, w), snap, cache.pos)
    if cfg.method == "pyramidkv":
        full = lambda s, lb: torch.full(s.shape[:2], lb, device=s.device)  # [B, H_kv] budget of one layer
        budgets = [full(s, lb) for s, lb in zip(snap, budgets_pyramid(n, b, w, cfg.beta))]
        return each(lambda s, p, lb: pick(s, p, lb, w), snap, cache.pos, budgets)
    if cfg.method == "adakv":
        return each(lambda s, p: pick(s, p, budgets_adakv(s, b, w, cfg.alpha), w), snap, cache.pos)
    # laq / laqpp: score the prompt keys with the queries of pseudo tokens decoded on a SnapKV copy
    snap_kept = each(lambda s, p: pick(s, p, b, w), snap, cache.pos)
    pseudo_q, pseudo_pos = lookahead_queries(model, cache, prompt_logits, snap_kept, next_pos, cfg.lookahead, eos_ids)
    w2 = cfg.window_laqpp if cfg.method == "laqpp" else 0
    pseudo_pos = [pseudo_pos] * n
    if w2:
        suffix_q, suffix_pos = [q[:, :, -w2:] for q in obs_q], [p[:, -w2:] for p in obs_pos]
        score = lambda pq, k, pp, kp, sq, sp: pick(score_laq(pq, k, pp, kp, sq, sp, kernel, pool), kp, b, w2)
        return each(score, pseudo_q, cache.k, pseudo_pos, cache.pos, suffix_q, suffix_pos)
    score = lambda pq, k, pp, kp: pick(score_laq(pq, k, pp, kp, None, None, kernel, pool), kp, b, 0)
    return each(score, pseudo_q, cache.k, pseudo_pos, cache.pos)
