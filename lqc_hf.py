"""lqc's eviction policies on Hugging Face transformers models (optional: requirements-hf.txt).

For models that need transformers (several GPUs with device_map="auto"): the Llama family,
Mistral, Qwen2/2.5, Qwen3 and Phi-3. The policies, `plan_eviction` and the lookahead are lqc.py's
own functions; this file only hands them the transformers cache as tensors and a lookahead step
(`query_step`: tokens -> logits and queries over a DynamicCache).

Queries are captured by forward pre-hooks on each attention module (its query projection, then
RoPE with the cos/sin transformers hands that module), registered only while needed: transformers'
attention is never patched.

Two entry points:
    compress(model, input_ids, method, budget)  prefill + eviction -> a physically smaller DynamicCache
    LQCPress(method, budget=... | compression_ratio=...)
        a kvpress-style press: `pipeline("kv-press-text-generation", model=...)(context, question=q, press=press)`
        or `with press(model): model.model(input_ids=ctx, past_key_values=cache)`.
kvpress's presses are per-layer hooks that compress each layer as its forward ends. LAQ cannot be
one: its pseudo tokens need every layer's prefilled cache. LQCPress therefore hooks the end of the
whole decoder's forward, where the complete cache is known, and runs lqc's eviction there.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

import lqc
from lqc_modules import decoding as D, model as M  # lqc's own files, without taking the names from your code


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in order."""
    return [layer.self_attn for layer in model.model.layers]


@contextmanager
def capture_queries(model, keep: int | None = None):
    """While active, each forward appends every layer's post-RoPE queries `[B, H_q, T, D]` to the
    yielded list of per-layer lists (only the last `keep` per call when given)."""
    store: list[list[torch.Tensor]] = [[] for _ in attention_modules(model)]

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)  # [B, T, dim]
        cos, sin = kwargs["position_embeddings"]  # [B, T, D]
        if keep is not None:
            x, cos, sin = x[:, -keep:], cos[:, -keep:], sin[:, -keep:]
        q = project_queries(module, x).transpose(1, 2)  # [B, H_q, T, D]
        store[module.layer_idx].append(M.apply_rope(q, cos[:, None], sin[:, None]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def project_queries(module, x: torch.Tensor) -> torch.Tensor:
    """An attention module's queries before RoPE, x `[B, T, dim]` -> `[B, T, H_q, D]`, as its own
    forward computes them: q_proj with its bias (Qwen2), the q third of a fused qkv_proj (Phi-3),
    then the per-head q_norm where the family has one (Qwen3)."""
    B, T, _ = x.shape
    if hasattr(module, "qkv_proj"):
        q = module.qkv_proj(x)[..., : module.config.num_attention_heads * module.head_dim]
    else:
        q = module.q_proj(x)
    q = q.view(B, T, -1, module.head_dim)
    return module.q_norm(q) if hasattr(module, "q_norm") else q


def dynamic_cache(keys: list, values: list, positions: list):
    """Per-layer K, V `[B, H_kv, S, D]` as a transformers DynamicCache (same tensors). transformers
    masks a cache by its length, so every KV head of a layer must hold the same number of real
    entries: positions `[B, H_kv, S]` must have no empty slot (-1)."""
    from transformers import DynamicCache
    dyn = DynamicCache()
    for l, (k, v, p) in enumerate(zip(keys, values, positions)):
        if (p < 0).any():
            raise ValueError("this cache has ragged KV heads (Ada-KV) or padding, which transformers' DynamicCache "
                             "cannot hold: use lqc's own generate.py for ragged budgets")
        dyn.update(k, v, l)
    return dyn


def query_step(model, dyn):
    """LAQ's lookahead step (see `lqc.lookahead`) over a transformers DynamicCache, which it grows:
    tokens, pos `[B, 1]` -> (logits `[B, V]` fp32, post-RoPE queries per layer `[B, H_q, 1, D]`)."""
    def step(tokens, pos):
        S = dyn.get_seq_length()
        with capture_queries(model) as qs:
            out = model(input_ids=tokens, position_ids=pos, past_key_values=dyn, use_cache=True,
                        cache_position=torch.arange(S, S + tokens.shape[1], device=tokens.device))
        return out.logits[:, -1].float(), [q[0] for q in qs]
    return step


def eos_ids(model) -> tuple[int, ...]:
    e = model.generation_config.eos_token_id
    return tuple(e if isinstance(e, list) else [] if e is None else [e])


@torch.no_grad()
def compress(model, input_ids: torch.Tensor, method: str, budget: int, **options):
    """Prefill `input_ids` `[B, L]` with the transformers model under `LQCPress(method, budget)` and
    return (the physically smaller DynamicCache, the prefill logits `[B, V]`, the kept indices per
    layer or None). Decode from the cache at positions L, L+1, ..."""
    from transformers import DynamicCache
    press, cache = LQCPress(method, budget=budget, options=options), DynamicCache()
    with press(model):
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].float(), press.last_indices


@torch.no_grad()
def greedy(model, cache, logits, start: int, max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers from a (compressed) cache, tokens at positions start, start+1, ...
    decoding.decode's loop, with a transformers forward as its step."""
    def step(tokens, pos, dyn):
        return model(input_ids=tokens, position_ids=pos, past_key_values=dyn).logits[:, -1].float(), None
    start_pos = torch.tensor([start], device=logits.device)
    return D.decode(model, cache, logits, start_pos, max_new_tokens=max_new_tokens, eos_ids=eos_ids(model), step=step)[0]


def _base_press():
    try:
        from kvpress.presses.base_press import BasePress
        return BasePress
    except ImportError:  # kvpress is optional: LQCPress works as a context manager without it
        return object


@dataclass
class LQCPress(_base_press()):
    """A kvpress-compatible press for any lqc method (LAQ included). Give `budget` (kept entries per
    KV head per layer) or `compression_ratio` (share removed, as kvpress presses take it).

        with LQCPress("laqpp", budget=128)(model):
            model.model(input_ids=context_ids, past_key_values=cache)   # cache is compressed on exit of the forward
    """
    method: str = "laqpp"
    budget: int | None = None
    compression_ratio: float | None = None
    options: dict = field(default_factory=dict)  # EvictConfig fields: window, lookahead, kernel, pool, ...
    last_indices: list | None = field(default=None, repr=False)

    def budget_for(self, L: int) -> int:
        if self.budget is not None:
            return self.budget
        return max(1, int(L * (1 - (self.compression_ratio or 0.0))))  # as kvpress's compute_n_kept

    @contextmanager
    def __call__(self, model):
        busy = [False]
        cfg = lqc.EvictConfig(method=self.method, **self.options)
        keep = None if cfg.needs_mass else max(cfg.obs_window, 1)  # H2O needs every prompt query

        def after_prefill(module, args, kwargs, output):
            cache = kwargs.get("past_key_values")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if busy[0]:
                return output  # our own lookahead
            mask = kwargs.get("attention_mask")
            if mask is not None and ids is not None and not bool(mask.all()):
                # a left-padded batch: the press would score padding as prompt (say so, not evict wrongly)
                raise ValueError("LQCPress compresses unpadded prompts: run each prompt of a padded batch alone, "
                                 "or use lqc's own run_batch, which evicts each padded row as if alone")
            if cache is not None and ids is not None and ids.shape[1] > 1 and self.last_indices is not None \
                    and cache.get_seq_length() > ids.shape[1]:
                raise ValueError("LQCPress saw a second prompt chunk after compressing the first: it compresses a "
                                 "prompt prefilled in one forward (a chunked prefill would be evicted chunk by chunk)")
            if cache is None or ids is None or cache.get_seq_length() != ids.shape[1]:
                for q in queries:  # not a prefill from an empty cache: a decoding step
                    q.clear()
                return output
            busy[0] = True
            try:
                self._evict(model, cache, ids, output.last_hidden_state, queries)
            finally:
                busy[0] = False
                for q in queries:
                    q.clear()
            return output

        self.last_indices = None  # set by the first prompt's compression in this context
        with capture_queries(model, keep) as queries:
            handle = model.model.register_forward_hook(after_prefill, with_kwargs=True)
            try:
                yield self
            finally:
                handle.remove()

    @torch.no_grad()
    def _evict(self, model, cache, ids, hidden, queries):
        B, L = ids.shape
        dev = ids.device
        cfg = lqc.EvictConfig(method=self.method, budget=self.budget_for(L), **self.options)
        keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
        positions = [torch.arange(L, device=k.device).expand(B, k.shape[1], L) for k in keys]  # [B, H_kv, L]
        pos = torch.arange(L, device=dev).expand(B, L)
        q_all = [q[-1] for q in queries]  # this forward's queries per layer [B, H_q, T, D]
        w = min(q_all[0].shape[2], max(cfg.obs_window, 1))
        mass = None
        if cfg.needs_mass:  # exact, one chunk of queries at a time
            mass = [sum(lqc.attention_mass(q[:, :, s:s + 512], k, pos[:, s:s + 512], p)
                        for s in range(0, L, 512)) for q, k, p in zip(q_all, keys, positions)]
        logits = model.lm_head(hidden[:, -1:]).float()[:, -1]  # [B, V] the prefill logits
        obs = lqc.Observation(logits, torch.full((B,), L, device=dev), [q[:, :, -w:] for q in q_all], pos[:, -w:], mass)

        def compacted(indices):
            return [lqc.gather(i, k, v, p) for i, k, v, p in zip(indices, keys, values, positions)]

        def lookahead_step(kept):
            return query_step(model, dynamic_cache(*zip(*compacted(kept))))

        indices = lqc.plan_eviction(cfg, obs, keys=keys, positions=positions, lookahead_step=lookahead_step,
                                    eos_ids=eos_ids(model))
        self.last_indices = indices
        if indices is None:
            return
        small = dynamic_cache(*zip(*compacted(indices)))
        for layer, new in zip(cache.layers, small.layers):  # shrink in place: the caller's cache object
            layer.keys, layer.values = new.keys, new.values
