"""The network and its caches: ModelArgs, RoPE, the KV caches and a from-scratch Llama.

Supported: the Llama family (Llama 2, Llama 3/3.1/3.2 with rope scaling, TinyLlama, SmolLM/SmolLM2,
Mistral) and the few-line variants Qwen2/2.5 (q/k/v biases), Qwen3 (per-head q/k RMSNorm) and
Phi-3 mini (Llama's network; its fused weights are split at load time). Reading checkpoints is
checkpoint.py's job, tokenizers and chat formats are tokenizer.py's.

The model knows nothing about eviction. It exposes what eviction needs: the cache (keys stored
post-RoPE, every entry with its absolute position) and, on request, the post-RoPE queries of
the tokens of a forward call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import CheckpointError  # noqa: F401 (re-exported: checkpoint.py and the tests raise it as model's)
from lqc import gather, visible


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
    qkv_bias: bool = False  # Qwen2: biases on the q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k, before RoPE

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        return cls(**PRESETS[name])

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
    """Which keys each query sees (`lqc.visible`): k_pos `[B, H_kv, S]`, q_pos `[B, T]` -> `[B, H_kv, T, S]`."""
    return visible(k_pos[:, :, None, :], q_pos[:, None, :, None])


def cache_mask_mod(k_pos: torch.Tensor, q_pos: torch.Tensor, group: int):
    """The same mask as a FlexAttention `mask_mod`; query head h reads KV head h // group. One
    closure feeds both FlexAttention's block mask and the dense reference (`create_mask`)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return visible(k_pos[b, h // group, kv_idx], q_pos[b, q_idx])
    return mask_mod


class KVCache:
    """Per layer K and V `[B, H_kv, T, D]` (keys post-RoPE) and the absolute position of every entry
    `[B, H_kv, T]`; position -1 marks an empty slot (a KV head that keeps fewer entries than others).

    Kept per KV head, never repeated per query head. Eviction builds a smaller cache with `gather`.
    `k[l]`, `v[l]`, `pos[l]` are prefix views of buffers with room to grow, so a decode step
    writes its token in place instead of copying the whole cache (as `torch.cat` would). After
    an eviction or a rewind the next append copies the entries into new buffers once.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.pos: list[torch.Tensor | None] = [None] * n_layers
        self.room: list[tuple | None] = [None] * n_layers  # per layer the (k, v, pos) buffers
        self.max_width: int | None = None  # appends never allocate past it (a decode-time cache limit)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Append k, v `[B, H_kv, T, D]` at positions `[B, T]`; return the layer's whole cache."""
        new = (k, v, pos[:, None, :].expand(-1, k.shape[1], -1))  # pos: [B, H_kv, T]
        if self.k[layer] is None:  # a prompt's (first) chunk, kept as computed: no copy, no room
            self.k[layer], self.v[layer], self.pos[layer] = new
            return new
        n, T = self.width(layer), k.shape[2]
        if not self._has_room(layer, n + T):
            self._grow(layer, n + T, like=new)
        for buf, x in zip(self.room[layer], new):
            buf[:, :, n:n + T] = x
        self.k[layer], self.v[layer], self.pos[layer] = (buf[:, :, :n + T] for buf in self.room[layer])
        return self.k[layer], self.v[layer], self.pos[layer]

    def width(self, layer: int) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def _has_room(self, layer: int, need: int) -> bool:
        """Whether the layer's entries are still the prefix of its buffers and the buffers hold
        `need` entries. `rewind` and `compact` drop the room themselves; this also catches code
        that assigns `k`, `v` or `pos` directly (the fields are public)."""
        if self.room[layer] is None or self.room[layer][0].shape[2] < need:
            return False
        return all(t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride()
                   for t, buf in zip((self.k[layer], self.v[layer], self.pos[layer]), self.room[layer]))

    def _grow(self, layer: int, need: int, like):
        """New buffers for `need` entries plus room (an eighth more, at least 256), the current
        entries copied in: decoding copies the cache once per n/8 tokens, not once per token."""
        n, cap = self.width(layer), need + max(256, need // 8)
        if self.max_width is not None:
            cap = max(need, min(cap, self.max_width))
        self.room[layer] = tuple(x.new_empty(*x.shape[:2], cap, *x.shape[3:]) for x in like)
        if n:
            for buf, t in zip(self.room[layer], (self.k[layer], self.v[layer], self.pos[layer])):
                buf[:, :, :n] = t

    def attend(self, layer: int, q, k, v, q_pos):
        return grouped_attention(q, k, v, q_pos, self.pos[layer])

    def gather(self, indices: list[torch.Tensor]) -> "KVCache":
        """A new cache holding, per layer, the entries `indices[l]` `[B, H_kv, K]` (sorted; index T
        pads a head that keeps fewer entries and becomes an empty slot)."""
        out = KVCache(len(self.k))
        for l, idx in enumerate(indices):
            out.k[l], out.v[l], out.pos[l] = gather(idx, self.k[l], self.v[l], self.pos[l])
        return out

    def rewind(self, limit: torch.Tensor):
        """Forget every entry at a position >= limit[b] `[B]` (draft tokens that verification rejected):
        their slots become empty, and columns left empty at the end are cut, so a batch whose rows
        agree is exactly as if the rejected tokens had never been fed."""
        for l, pos in enumerate(self.pos):
            # in place where the entries are the prefix of their buffers, so the room stays and the
            # next append writes in place (verify mode rewinds every round: no copy of the cache per
            # round); the rejected entries are dropped, so nothing may read them any more
            roomy = self._has_room(l, self.width(l))
            drop = pos >= limit[:, None, None]  # [B, H_kv, T]
            pos = pos.masked_fill_(drop, -1) if roomy else pos.masked_fill(drop, -1)
            width = int((pos >= 0).flatten(0, 1).any(0).nonzero().max()) + 1
            self.k[l], self.v[l], self.pos[l] = self.k[l][:, :, :width], self.v[l][:, :, :width], pos[:, :, :width]
            if not roomy:
                self.room[l] = None

    def compact(self, indices: list[torch.Tensor]):
        """In place: keep only the entries `indices[l]` (decode-time eviction, a cache limit)."""
        kept = self.gather(indices)
        self.k, self.v, self.pos = kept.k, kept.v, kept.pos
        self.room = [None] * len(self.k)  # free the old buffers now

    @staticmethod
    def stack(caches: list["KVCache"]) -> "KVCache":
        """One batch of the rows of several caches (each of batch 1 or more), every layer padded at
        the end to the widest with empty slots: rows decode together, each as it would alone."""
        out = KVCache(len(caches[0].k))
        for l in range(len(out.k)):
            width = max(c.width(l) for c in caches)
            pad = lambda t, value: F.pad(t, (0, 0, 0, width - t.shape[2]) if t.ndim == 4 else (0, width - t.shape[2]),
                                         value=value)
            out.k[l] = torch.cat([pad(c.k[l], 0.0) for c in caches])
            out.v[l] = torch.cat([pad(c.v[l], 0.0) for c in caches])
            out.pos[l] = torch.cat([pad(c.pos[l], -1) for c in caches])
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
        return self.width(0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """int8 entries (`--kv-bits 8`): x `[..., D]` -> `[..., D + 4]` int8, the codes of x / scale and
    then the 4 bytes of the float32 scale (absmax / 127, one per entry: per token and KV head). The
    scale rides in the same row as its codes, so gather, compact and rewind move them together.
    Keys are divided by a per-channel scale first (`channel_scale`): see StaticKVCache."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127  # [..., 1]
    codes = (x.float() / scale).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([codes, scale.view(torch.int8)], -1)


def dequantize(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantize`'s inverse, up to rounding: `[..., D + 4]` int8 -> `[..., D]` in dtype."""
    D = q.shape[-1] - 4
    return (q[..., :D].float() * q[..., D:].contiguous().view(torch.float32)).to(dtype)


def channel_scale(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per KV head and channel, the largest |key| over the valid entries: k `[B, H, S, D]`, pos
    `[B, H, S]` -> `[B, H, 1, D]` float32 (1 where a head holds nothing)."""
    k = k.float().abs().masked_fill((pos < 0)[..., None], 0).amax(2, keepdim=True)
    return torch.where(k > 0, k, 1.0)


def valid_first(cache: KVCache) -> list[tuple]:
    """Per layer (k, v, pos) with each head's valid entries first, in order, as wide as the fullest head."""
    valid = [p >= 0 for p in cache.pos]  # [B, H, S] per layer
    width = max(int(m.sum(-1).max()) for m in valid)
    return [gather((~m).to(torch.int8).argsort(dim=-1, stable=True)[..., :width], k, v, p)
            for m, k, v, p in zip(valid, cache.k, cache.v, cache.pos)]


class StaticKVCache(nn.Module):
    """The fast path's cache: per layer fixed-capacity buffers K, V `[B, H_kv, C, D]`, a position per
    slot `[B, H_kv, C]` (-1 = empty) and a valid length per head `[B, H_kv]`: each head's entries
    fill a prefix of its slots, so heads may hold different numbers (Ada-KV, PyramidKV). New tokens
    are written in place at each head's length: no reallocation and no shape change from one
    decode step to the next (torch.compile friendly). One buffer per layer, not one stacked
    tensor: compiled FlexAttention on CPU wants the mask's captured tensors to be graph inputs,
    not views.
    """

    BLOCK = 128  # FlexAttention's KV block; with flex the capacity is rounded up to a multiple of it

    def __init__(self, n_layers, batch, n_kv_heads, capacity, head_dim, group, dtype, device, flex=False,
                 kv_bits: int | None = None):
        super().__init__()
        C = -(-capacity // self.BLOCK) * self.BLOCK if flex else capacity
        self.group, self.flex, self.dtype = group, flex, dtype  # dtype: what attention computes in
        # int8: K and V as `quantize` rows (D int8 codes + a float32 scale per entry); keys divided by
        # a per-channel scale first, set from the entries a row is packed with. Measured on 2k-token
        # prompts (`bench.py --kv-error`, README): per-token key scales alone lose outlier channels
        # (Qwen2.5: attention error up to 33% in a layer); per-channel then per-token keeps every layer within ~7%
        self.int8 = kv_bits == 8
        width, store = (head_dim + 4, torch.int8) if self.int8 else (head_dim, dtype)
        for l in range(n_layers):
            self.register_buffer(f"k{l}", torch.zeros(batch, n_kv_heads, C, width, dtype=store, device=device))
            self.register_buffer(f"v{l}", torch.zeros(batch, n_kv_heads, C, width, dtype=store, device=device))
            if self.int8:
                self.register_buffer(f"kc{l}", torch.ones(batch, n_kv_heads, 1, head_dim, device=device))
            self.register_buffer(f"pos{l}", torch.full((batch, n_kv_heads, C), -1, dtype=torch.long, device=device))
            self.register_buffer(f"length{l}", torch.zeros(batch, n_kv_heads, dtype=torch.long, device=device))
        self.n_layers = n_layers

    # Views of the registered buffers, looked up on every access: a list built once would keep
    # pointing at the old tensors after `.to()` or `load_state_dict`.
    def _layers(self, name: str) -> list[torch.Tensor]:
        return [self._buffers[f"{name}{l}"] for l in range(self.n_layers)]

    def _buf(self, name: str, layer: int) -> torch.Tensor:
        return self._buffers[f"{name}{layer}"]

    k = property(lambda self: self._layers("k"))
    v = property(lambda self: self._layers("v"))
    pos = property(lambda self: self._layers("pos"))
    length = property(lambda self: self._layers("length"))

    @classmethod
    def from_cache(cls, cache: KVCache, extra: int, group: int, flex: bool = False,
                   capacity: int | None = None, kv_bits: int | None = None) -> "StaticKVCache":
        """Pack a (compacted) KVCache, leaving room for `extra` new tokens per head, in at least
        `capacity` slots per head (a cache limit sizes every cache of a run alike)."""
        B, H, _, D = cache.k[0].shape
        entries = valid_first(cache)
        width = entries[0][2].shape[-1]
        out = cls(len(cache.k), B, H, max(width + extra, capacity or 0), D, group, cache.k[0].dtype,
                  cache.k[0].device, flex, kv_bits)
        for l, kvp in enumerate(entries):
            out._place(l, *kvp)
        return out

    def load(self, row: int, cache: KVCache):
        """Write a (compacted) cache of batch 1 into batch row `row` (a server's slot), in place:
        the other rows, the shapes and the addresses stay, so a compiled step runs on."""
        entries = valid_first(cache)
        if entries[0][2].shape[-1] > self.capacity:
            raise ValueError(f"{entries[0][2].shape[-1]} entries per KV head do not fit a row of {self.capacity}")
        for l, kvp in enumerate(entries):
            self._place(l, *kvp, rows=slice(row, row + 1))

    def clear(self, rows: torch.Tensor):
        """Empty the rows where `rows` `[B]` (bool) is set: no entry of theirs is seen any more."""
        self.rewind(torch.where(rows, 0, torch.iinfo(torch.long).max))

    def compact(self, indices: list[torch.Tensor]):
        """In place: per layer, the entries `indices[l]` `[B, H_kv, K]` (sorted, so valid entries
        come first) move to the first K slots; the other slots become empty. The buffers keep their
        shapes and addresses, so a compiled decode step runs on without recompiling."""
        for l, idx in enumerate(indices):
            self._place(l, *gather(idx, self._buf("k", l), self._buf("v", l), self._buf("pos", l)))

    def _place(self, layer: int, k, v, pos, rows=slice(None)):
        """Entries k, v `[B, H_kv, K, D]` at pos `[B, H_kv, K]` (valid ones first) into the first K
        slots of each head of `rows`; the slots after them become empty."""
        K = pos.shape[-1]
        kb, vb, pb = (self._buf(name, layer) for name in ("k", "v", "pos"))
        if self.int8 and k.dtype != torch.int8:  # new entries (not a compaction of stored ones): their channel scale
            self._buf("kc", layer)[rows] = channel_scale(k, pos)
        k, v = self.store(k, layer, rows), self.store(v)
        kb[rows, :, :K], vb[rows, :, :K], pb[rows, :, :K] = k, v, pos
        pb[rows, :, K:] = -1
        self._buf("length", layer)[rows] = (pos >= 0).sum(-1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Write k, v `[B, H_kv, T, D]` at positions `[B, T]` into each head's next free slots."""
        B, H, T, _ = k.shape
        kb, vb, pb, length = (self._buf(name, layer) for name in ("k", "v", "pos", "length"))
        if layer == 0 and not torch.compiler.is_compiling() and int(length.max()) + T > kb.shape[2]:
            # eager only (a compiled step cannot branch on data; its caller sizes the cache): a clear
            # error instead of an IndexError on CPU or a device-side assert on CUDA
            raise ValueError(f"the static cache is full: {int(length.max())} of {kb.shape[2]} slots per KV head are "
                             f"used and {T} more were written; size it for prompt + new tokens (from_cache's extra)")
        slot = length[..., None] + torch.arange(T, device=k.device)  # [B, H_kv, T]
        b = torch.arange(B, device=k.device)[:, None, None]
        h = torch.arange(H, device=k.device)[None, :, None]
        # index_put_, not scatter_: torch.compile writes it in place, while a compiled scatter_
        # copies the whole buffer twice per layer and step (a third of the step at 8k entries, CPU)
        kb[b, h, slot], vb[b, h, slot], pb[b, h, slot] = self.store(k, layer), self.store(v), pos[:, None, :].expand_as(slot)
        length += T
        return kb, vb, pb

    def store(self, x: torch.Tensor, key_layer: int | None = None, rows=slice(None)) -> torch.Tensor:
        """Entries as the buffers hold them: int8 rows (`quantize`; keys of `key_layer` over its
        channel scale) or as they are."""
        if not self.int8 or x.dtype == torch.int8:
            return x
        return quantize(x if key_layer is None else x / self._buf("kc", key_layer)[rows])

    def entries(self, layer: int, k, v):
        """K and V as attention reads them, from what `update` returned (dequantized when int8)."""
        if not self.int8:
            return k, v
        return dequantize(k, self.dtype) * self._buf("kc", layer).to(self.dtype), dequantize(v, self.dtype)

    def rewind(self, limit: torch.Tensor):
        """Forget every entry at a position >= limit[b] `[B]` (rejected draft tokens). New entries are
        written in position order, so these are each head's last ones: the head's length drops by
        their count and their slots become empty, to be overwritten by the next tokens."""
        for l in range(self.n_layers):
            pos, length = self._buf("pos", l), self._buf("length", l)
            drop = pos >= limit[:, None, None]  # [B, H_kv, C]
            length -= drop.sum(-1)
            pos.masked_fill_(drop, -1)

    def attend(self, layer: int, q, k, v, q_pos):
        # FlexAttention serves the compiled single-token step; a draft's verification (several
        # queries) runs eagerly, where FlexAttention would fall back to an unfused kernel
        if not self.flex or q.shape[2] > 1:
            pos = self._buf("pos", layer)
            if not torch.compiler.is_compiling():  # eager: only the filled slots, often without a mask
                n = int(self._buf("length", layer).max())
                k, v, pos = k[:, :, :n], v[:, :, :n], pos[:, :, :n]
            k, v = self.entries(layer, k, v)
            return grouped_attention(q, k, v, q_pos, pos)
        k, v = self.entries(layer, k, v)
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
        B, H, C = self._buf("pos", layer).shape
        n_blocks = -(-self._buf("length", layer) // self.BLOCK)  # [B, H_kv]
        n_blocks = n_blocks.repeat_interleave(self.group, dim=1)[:, :, None].to(torch.int32)  # [B, H_q, 1]
        idx = torch.arange(C // self.BLOCK, device=q_pos.device, dtype=torch.int32).expand(B, H * self.group, 1, -1)
        return BlockMask.from_kv_blocks(n_blocks, idx, BLOCK_SIZE=self.BLOCK, seq_lengths=(q_pos.shape[1], C),
                                        mask_mod=cache_mask_mod(self._buf("pos", layer), q_pos, self.group))

    def kept(self) -> torch.Tensor:
        return torch.stack(self.length)

    @property
    def capacity(self) -> int:
        return self._buf("k", 0).shape[2]


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
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()

    def qkv(self, x, cos, sin):
        """x `[B, T, dim]` -> post-RoPE q `[B, H_q, T, D]`, k and v `[B, H_kv, T, D]`."""
        B, T, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.q_norm(self.wq(x).view(B, T, Hq, D)).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_norm(self.wk(x).view(B, T, Hkv, D)).transpose(1, 2), cos, sin)
        return q, k, self.wv(x).view(B, T, Hkv, D).transpose(1, 2)


def grouped_attention(q, k, v, q_pos, k_pos):
    """Attention of queries at positions q_pos `[B, T]` over keys at k_pos `[B, H_kv, S]`, masked by
    position (`lqc.visible`), GQA without repeating K/V. q `[B, H_q, T, D]`, k/v `[B, H_kv, S, D]`
    -> `[B, H_q, T, D]`."""
    if is_causal_block(q_pos, k_pos):
        # the position mask is exactly the causal one: SDPA's causal kernel skips the upper
        # triangle instead of reading (and converting) a materialized mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv  # query head h reads KV head h // G
    # the G query heads of a KV head folded into the query-length axis: one SDPA call per KV head
    # serves the group (and is fast in bf16 on CPU, unlike enable_gqa with one query). reshape, not
    # view, on the way back: CUDA kernels may return the output in a [B, G*T, H_kv, D] layout
    qg = q.reshape(B, Hkv, G * T, D)
    if sees_every_key(q_pos, k_pos):  # decoding over a cache without holes: the mask would be all True
        return F.scaled_dot_product_attention(qg, k, v).reshape(B, Hq, T, D)
    mask = position_mask(k_pos, q_pos)  # [B, H_kv, T, S]
    mg = mask[:, :, None].expand(B, Hkv, G, T, S).reshape(B, Hkv, G * T, S)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mg).reshape(B, Hq, T, D)


def sees_every_key(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether `visible` holds for every query and key (no empty slot, no key after a query), so
    SDPA needs no mask: building and converting one over thousands of keys costs more than the
    check. Skipped inside torch.compile, where a data-dependent branch would break the graph."""
    if torch.compiler.is_compiling():
        return False
    return bool((k_pos >= 0).all() and k_pos.max() <= q_pos.min())


def is_causal_block(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Whether the keys are the queries' own tokens (a prompt prefilled from an empty cache) at
    increasing positions without padding: then `visible` is the lower triangle."""
    if k_pos.shape[-1] != q_pos.shape[-1]:
        return False
    return bool((q_pos >= 0).all() and (q_pos[:, 1:] > q_pos[:, :-1]).all()
                and torch.equal(k_pos, q_pos[:, None].expand_as(k_pos)))


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

    def forward(self, x, cos, sin, pos, cache, keep: int | None = None, fused=None):
        """Every token's query, K and V (into the cache); attention and the output `[B, T', dim]`
        only for the last `keep` tokens (all by default). The work before and after attention is
        two tensor-only segments, `qkv` and `mix`; `fused` holds compiled versions of them
        (`Transformer.fuse_prefill`)."""
        qkv, mix = fused or (Block.qkv, Block.mix)
        layer = self.attention.layer
        q, k, v = qkv(self, x, cos, sin)
        k_all, v_all, _ = cache.update(layer, k, v, pos)  # [B, H_kv, S, D]
        q_out, q_pos = (q, pos) if keep is None else (q[:, :, -keep:], pos[:, -keep:])
        y = cache.attend(layer, q_out, k_all, v_all, q_pos)  # [B, H_q, T', D]
        return mix(self, x if keep is None else x[:, -keep:], y), q

    def qkv(self, x, cos, sin):
        return self.attention.qkv(self.attention_norm(x), cos, sin)

    def mix(self, x, y):
        """The attention output y `[B, H_q, T, D]` projected and added, then the MLP's residual."""
        x = x + self.attention.wo(y.transpose(1, 2).flatten(2))
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.fused = None  # compiled Block.qkv / Block.mix for prefill (fuse_prefill)

    def fuse_prefill(self) -> float:
        """Compile the element-wise work around each layer's matmuls (RMSNorm, RoPE, SwiGLU, residuals)
        for prefill: one dynamic compilation serves every layer and prompt length (inductor caches
        it on disk). Attention itself stays the caches' (SDPA). Compiles at once, on an 8-token
        chunk, and returns the seconds that took (7.5 s cold for SmolLM2 on this project's CPU)."""
        import time
        self.fused = (torch.compile(Block.qkv, dynamic=True), torch.compile(Block.mix, dynamic=True))
        w = self.tok_embeddings.weight
        x = torch.zeros(1, 8, self.args.dim, dtype=w.dtype, device=w.device)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(8, device=w.device)[None], w.dtype)
        t = time.perf_counter()
        with torch.no_grad():
            q, _, _ = self.fused[0](self.layers[0], x, cos, sin)
            self.fused[1](self.layers[0], x, torch.zeros_like(q))
        return time.perf_counter() - t

    def _apply(self, fn, recurse=True):
        # RoPE frequencies stay fp32 whatever dtype the weights move to: in bf16 they would put a
        # phase error of several radians on positions in the thousands
        inv_freq = rope_inv_freq(self.args) if self.inv_freq.is_meta else self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def new_cache(self) -> KVCache:
        return KVCache(self.args.n_layers)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache, return_queries: bool = False, *,
                last_logits: int | None = None, last_queries: int | None = None, prefill: bool = False):
        """tokens, pos `[B, T]` -> logits `[B, T, V]` (fp32); with `return_queries`, also the post-RoPE
        queries of these tokens per layer, a list of `[B, H_q, T, D]`. The cache grows by T.
        last_logits / last_queries: only those of the last n tokens (a prefill needs the final
        logits and a few queries, not `[B, L, V]`). prefill: a prompt chunk, run with the
        fused segments when `fuse_prefill` made them."""
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)
        queries = []
        # the last layer's outputs feed only the logits asked for: its other tokens need their
        # queries and K/V, not attention and MLP (a prefill skips most of a layer)
        fused = self.fused if prefill else None  # decoding has its own compiled step
        for i, block in enumerate(self.layers):
            x, q = block(x, cos, sin, pos, cache, last_logits if i == len(self.layers) - 1 else None, fused)
            if return_queries:
                queries.append(q if last_queries is None else q[:, :, -last_queries:])
        x = self.norm(x)  # [B, T or last_logits, dim]: the last block kept only those
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = F.linear(x, head).float()
        return (logits, queries) if return_queries else logits
