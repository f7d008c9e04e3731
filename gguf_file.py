"""GGUF files read fast: the header parsed with `struct` (metadata as plain Python values) and the
common quantized types dequantized with whole-tensor torch ops.

The `gguf` package's reader makes a numpy view per metadata element: a GGUF with a 151k-token
vocabulary (Qwen2.5) took 20 s to open, and its row-grouped dequantization another 11 s. Here the
header of the same file parses in well under a second and Q4_K / Q5_0 / Q6_K / Q8_0 / Q4_1 dequantize
as a few vectorized ops each. Other tensor types go through `gguf.quants.dequantize` (the
reference this file is tested against). Layouts follow llama.cpp's ggml-quants.c.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

# metadata value types: id -> struct format (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF lqc can read (truncated, corrupt, or a version it does not know)."""


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # as PyTorch orders it: [out, in] for a matrix (GGUF stores dims innermost first)
    type_id: int  # GGML quantization type id
    offset: int  # byte offset of the data in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        import gguf
        try:
            return gguf.GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.at = buf, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise GGUFFormatError(f"the file ends at byte {len(self.buf):,} inside the header")
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.at + n > len(self.buf):
            raise GGUFFormatError(f"a string of {n:,} bytes runs past the end of the file")
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY or depth > 0:  # llama.cpp writes no nested arrays
            raise GGUFFormatError(f"unknown metadata value type {kind}")
        sub, n = self.unpack("<I"), self.unpack("<Q")
        if n > len(self.buf) - self.at:  # every element takes at least a byte: refuse before looping
            raise GGUFFormatError(f"an array of {n:,} elements runs past the end of the file")
        if sub in _SCALARS:  # one unpack for the whole array
            fmt = _SCALARS[sub]
            size = struct.calcsize(fmt)
            if self.at + n * size > len(self.buf):
                raise GGUFFormatError(f"an array of {n:,} elements runs past the end of the file")
            out = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.at))
            self.at += n * size
            return out
        return [self.value(sub, depth + 1) for _ in range(n)]


def read_header(buf) -> tuple[dict, list[TensorInfo]]:
    """Metadata {key: int | float | bool | str | list} and the tensors' infos, from the file's bytes."""
    c = _Cursor(memoryview(buf))
    if bytes(c.buf[:4]) != b"GGUF":
        raise GGUFFormatError("no GGUF magic at the start")
    c.at = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.unpack("<I")
        if n_dims > 4:
            raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
        dims = [c.unpack("<Q") for _ in range(n_dims)]
        infos.append(TensorInfo(name, tuple(reversed(dims)), c.unpack("<I"), c.unpack("<Q"), 0))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFFormatError(f"general.alignment={align!r} is not a power of two")
    start = -(-c.at // align) * align
    for t in infos:
        t.offset += start
        t.nbytes = _nbytes(t)
        if t.offset + t.nbytes > len(c.buf):
            raise GGUFFormatError(f"tensor {t.name} runs past the end of the file")
    return meta, infos


def _nbytes(t: TensorInfo) -> int:
    import gguf
    n = 1
    for d in t.shape:
        n *= d
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type_id)]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"tensor {t.name} has unknown type {t.type_id}") from None
    if n % block:
        raise GGUFFormatError(f"tensor {t.name}: {n} elements are not whole blocks of {block}")
    return n // block * size


# ----------------------------------------------------------------------------------------------
# Dequantization: bytes [n_blocks, block_bytes] (uint8) -> fp32 [n_blocks, block_elements]

def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 stored in two uint8 columns `[n, 2]` -> fp32 `[n, 1]`."""
    return b.contiguous().view(torch.float16).float()


def _low_high(q: torch.Tensor) -> torch.Tensor:
    """Nibbles of `[n, 16]` bytes: the 16 low ones, then the 16 high ones -> `[n, 32]`."""
    return torch.cat([q & 0xF, q >> 4], dim=-1)


def deq_q8_0(b):  # d f16, 32 x int8
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def deq_q4_1(b):  # d f16, m f16, 16 bytes of nibbles
    return _f16(b[:, :2]) * _low_high(b[:, 4:]).float() + _f16(b[:, 2:4])


def deq_q5_0(b):  # d f16, 32 high bits (uint32 LE), 16 bytes of nibbles; values - 16
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=b.device)
    high = (b[:, 2:6, None] & bits).ne(0).reshape(-1, 32).to(torch.uint8)  # [n, 32]: bit j of qh, element j
    return _f16(b[:, :2]) * ((_low_high(b[:, 6:]) | high << 4).float() - 16)


def _scale_min_k4(s: torch.Tensor):
    """Q4_K's 8 six-bit scales and mins packed in 12 bytes `[n, 12]` -> two `[n, 8]`."""
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_m, hi_m], 1).float()


def deq_q4_k(b):  # d f16, dmin f16, 12 bytes of scales/mins, 128 bytes of nibbles: 8 sub-blocks of 32
    n = b.shape[0]
    sc, m = _scale_min_k4(b[:, 4:16])  # [n, 8]
    q = b[:, 16:].reshape(n, 4, 32)  # 4 chunks of 32 bytes: low nibbles = sub-block 2j, high = 2j + 1
    q = torch.stack([q & 0xF, q >> 4], dim=2).reshape(n, 8, 32).float()
    return (_f16(b[:, :2])[:, :, None] * sc[:, :, None] * q - _f16(b[:, 2:4])[:, :, None] * m[:, :, None]).reshape(n, 256)


def deq_q6_k(b):  # 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d f16; values - 32
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].view(torch.int8).float().reshape(n, 2, 8)
    q = torch.stack([(ql[..., :32] & 0xF) | ((qh & 3) << 4), (ql[..., 32:] & 0xF) | (((qh >> 2) & 3) << 4),
                     (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | ((qh >> 6) << 4)],
                    dim=2)  # [n, 2 halves, 4 quarters, 32], uint8 in [0, 64)
    scale = sc.reshape(n, 2, 4, 2, 1) * _f16(b[:, 208:210]).reshape(n, 1, 1, 1, 1)  # 16 values share a scale
    return (scale * (q.reshape(n, 2, 4, 2, 16).float() - 32)).reshape(n, 256)


DEQUANT = {8: deq_q8_0, 3: deq_q4_1, 6: deq_q5_0, 12: deq_q4_k, 14: deq_q6_k}  # GGML type ids


def dequantize(data: torch.Tensor, t: TensorInfo) -> torch.Tensor:
    """A tensor's bytes (uint8, `[nbytes]`) -> fp32 of its shape."""
    import gguf
    qtype = gguf.GGMLQuantizationType(t.type_id)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.view(torch.float32).reshape(t.shape).clone()
    if qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        dt = torch.float16 if qtype == gguf.GGMLQuantizationType.F16 else torch.bfloat16
        return data.view(dt).float().reshape(t.shape)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if t.type_id in DEQUANT:
        return DEQUANT[t.type_id](data.reshape(-1, size)).reshape(t.shape)
    w = gguf.quants.dequantize(data.numpy(), qtype)  # any other type: the reference implementation
    return torch.from_numpy(w.astype("float32").copy()).reshape(t.shape)
