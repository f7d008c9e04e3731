"""Single-token decode steps: the readable one, the fast path over static caches (compiled on
request, CUDA graphs on CUDA), and the device helpers they need. Every step in lqc has one
signature, `model_step`'s: step(tokens, pos `[B, 1]`, cache it grows) -> (logits `[B, V]`, queries
per layer); decoding, speculative drafts, the cache limit's evictor and LAQ's lookahead (with its
cache bound: `query_step`) all call the same kind of function."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

import model as M


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flex_available(device: torch.device) -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401 (the import is the check)
    except ImportError:
        return False
    return device.type in ("cpu", "cuda")


def make_step(model, compile: bool):
    """The single-token step (`model_step`), compiled on request (CUDA graphs on CUDA). Its shapes
    never change over a StaticKVCache of one capacity, so it compiles once per capacity."""
    step = model_step(model)
    if not compile:
        return step
    device = model.tok_embeddings.weight.device
    # dynamic=False: a new capacity gets its own static graph; the CPU FlexAttention kernel does
    # not compile with a symbolic KV length (torch 2.13)
    # fullgraph: a graph break (Python the compiler cannot trace) fails loudly instead of running
    # part of each step eagerly
    if device.type != "cuda":
        return torch.compile(step, dynamic=False, fullgraph=True)
    graph = torch.compile(step, mode="reduce-overhead", dynamic=False, fullgraph=True)

    def cuda_graph_step(tokens, pos, cache):
        # a CUDA graph replays into the same output buffers: the lookahead keeps every step's
        # queries, so each step's outputs are copied out before the next replay overwrites them
        torch.compiler.cudagraph_mark_step_begin()
        logits, queries = graph(tokens, pos, cache)
        return logits.clone(), [q.clone() for q in queries]
    return cuda_graph_step


def to_static(model, cache, extra: int, flex: bool, capacity: int | None = None, kv_bits: int | None = None):
    """Pack a (compacted) cache into the fast path's fixed-capacity buffers (int8 entries: kv_bits=8)."""
    return M.StaticKVCache.from_cache(cache, extra, model.args.n_heads // model.args.n_kv_heads, flex=flex,
                                      capacity=capacity, kv_bits=kv_bits)


def model_step(model):
    """One decode step: tokens, pos `[B, 1]` and a cache it grows -> (logits `[B, V]`, post-RoPE
    queries per layer `[B, H_q, 1, D]`). The queries cost nothing extra and let one (compiled)
    step serve both LAQ's lookahead and decoding."""
    def step(tokens, pos, cache):
        logits, queries = model(tokens, pos, cache, return_queries=True)
        return logits[:, -1], queries
    return step


def query_step(model, cache):
    """LAQ's lookahead step (see `lqc.lookahead`): `model_step` with its cache bound, which it grows."""
    return partial(model_step(model), cache=cache)


@dataclass
class FastPath:
    """Decoding over static (fixed-capacity) caches with one step function, compiled or not.
    The lookahead's compacted copy gets the same capacity as the decode cache where it can, so a
    compiled step serves both without compiling twice."""
    step: object  # model_step(model), maybe compiled
    extra: int  # room for new tokens beyond the kept entries
    flex: bool = False  # FlexAttention block masks (the compiled path)
    compile_s: float = 0.0  # time of the step's first call when compiled
    compiled: bool = False  # the step is compiled: its first call's time is compile_s, flex or not
    capacity: int | None = None  # slots per head of every packed cache, at least (a cache limit: exactly)
    kv_bits: int | None = None  # 8: int8 entries (see StaticKVCache)

    def pack(self, model, cache, extra: int | None = None, scratch: bool = False):
        """A static copy of `cache`; scratch (LAQ's lookahead copy): in full precision, whatever kv_bits."""
        return to_static(model, cache, self.extra if extra is None else extra, self.flex, self.capacity,
                         None if scratch else self.kv_bits)

    def __call__(self, tokens, pos, cache):
        if self.compile_s or not (self.compiled or self.flex):
            return self.step(tokens, pos, cache)
        t = time.perf_counter()
        out = self.step(tokens, pos, cache)
        self.compile_s = time.perf_counter() - t
        return out
