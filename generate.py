"""The command line: a prompt in, the answer streamed out, a one-line summary on stderr. The work is
decoding.py's `run` (prefill -> evict -> decode); this file reads flags, checks them, loads the
checkpoint and shows progress.

    python generate.py --ckpt llama --budget 256 --prompt "..."
    python generate.py --method laqpp --budget 128 --prompt-file examples/doc.txt
    python generate.py --method snapkv --budget 128 --cache-limit 512 --max-new-tokens 2048   # bounded memory

Stdout carries only the generated text, streamed; a one-line summary goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from functools import partial

import cli

if __name__ == "__main__":
    cli.quiet_ctrl_c()  # before the slow imports below (torch, through lqc)

import lqc
from cache_limit import EVICT_EVERY, check_limit
from checkpoint import load
from cli import BadInput
from decoding import run
from sampling import Sampling
from speculative import DRAFT_LEN, draft_tokens
from steps import flex_available

DEMO_PROMPT = """Read the notes and answer the question.

The harbour town of Wrenmouth sits at the mouth of a slow river. Its market opens at dawn on
Tuesdays and Saturdays, and the fishing boats come in before the bells ring at seven. The old
stone bridge was rebuilt twice, once after a winter flood and once after a cart of barrels
cracked its western arch. Children learn to swim in the shallow bay behind the church, where the
water stays warm until late September. The town library keeps a collection of ship logbooks, the
oldest of them written by a captain who sailed to Lisbon and back forty times.

The lighthouse on the northern cliff is kept by a woman named Agnes Morrow. She climbs its
one hundred and twelve steps every evening to light the lamp, and she paints its door a bright
green every spring. Visitors may climb the tower on Sunday afternoons if the wind is calm.

The bakery near the harbour is famous for its rye bread and its honey cakes, which sell out
before noon. In the summer a ferry carries travellers to the island of Carrow, a trip of forty
minutes when the sea is quiet.

Question: Who keeps the lighthouse in Wrenmouth, and what colour is its door?"""


class Streamer:
    """Prints the text of new tokens as they come (decoding the whole reply keeps multi-byte
    characters and leading spaces right)."""

    def __init__(self, tokenizer):
        self.tok, self.printed = tokenizer, ""

    def __call__(self, ids):
        text = self.tok.decode(ids)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next token
            return
        cli.write_stdout(text[len(self.printed):])
        self.printed = text


class Progress:
    """One status line on stderr, rewritten in place, only when stderr is a terminal: a long
    prefill or compiling the decode step is otherwise minutes of silence."""

    def __init__(self, enabled: bool):
        self.enabled, self.shown = enabled, False

    def show(self, text: str):
        if self.enabled:
            sys.stderr.write(f"\r{text}\033[K")
            sys.stderr.flush()
            self.shown = True

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


@contextmanager
def prefill_progress(model, n_tokens: int, progress: Progress, then: str):
    """Shows "prefill 512/8000 tokens, layer 12/30" from forward hooks (the model is not changed);
    the hooks go once the prompt's last layer has run, before the lookahead or a compiled step
    could see them, and `then` stays on the line."""
    fed, n_layers = [0], len(model.layers)

    def on_pass(module, args):  # args[0]: this pass's tokens [B, T]
        fed[0] += args[0].shape[1]

    def on_layer(i, module, args, output):
        progress.show(f"prefill {fed[0]}/{n_tokens} tokens, layer {i + 1}/{n_layers}")
        if i + 1 == n_layers and fed[0] >= n_tokens:
            remove()
            progress.show(then)

    handles = []
    if progress.enabled:
        handles = [model.register_forward_pre_hook(on_pass)]
        handles += [layer.register_forward_hook(partial(on_layer, i)) for i, layer in enumerate(model.layers)]

    def remove():
        for h in handles:
            h.remove()
    try:
        yield
    finally:
        remove()


class StreamAfterProgress:
    """The CLI's on_token: the answer prefix and the text go to stdout once the status line is
    cleared (both share the terminal). With --compile the first token waits one step more: other
    methods than LAQ compile the step right after it."""

    def __init__(self, streamer: Streamer, progress: Progress, prefix: str, compiling: bool):
        self.streamer, self.progress, self.prefix, self.hold = streamer, progress, prefix, compiling
        self.started = False

    def __call__(self, ids):
        if self.hold:
            self.hold = False
            self.progress.show("compiling the decode step (once per cache size; a minute or more on a CPU)")
            return
        self.start()
        self.streamer(ids)

    def start(self):
        if not self.started:
            self.progress.clear()
            cli.write_stdout(self.prefix)
            self.started = True

    def finish(self, ids):
        """After decoding: whatever is still held back."""
        self.start()
        self.streamer(ids)


def parse_args(argv=None):
    p = cli.ArgParser(description="Generate text with a Llama-family model and KV-cache eviction after prefill. "
                                  + cli.WINDOW_RULE + " Bad input ends with one line on stderr and exit code 2.")
    p.add_argument("--ckpt", default="smollm2", help="short name (smollm2, llama, ...), .gguf file, HF directory or hub id")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt (default: stdin when it is not a terminal, else the demo prompt)")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    src.add_argument("--demo", action="store_true", help="use the built-in demo prompt (a short document and a question)")
    p.add_argument("--answer-prefix", default="", help="text the reply starts with (appended after the chat header)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="> 0; prompt + this must fit the model's context")
    p.add_argument("--temperature", type=float, default=0.0, help=f"0 = greedy, else a finite number >= {cli.MIN_TEMPERATURE:g}")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="between -2**63 and 2**64-1")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the checkpoint's chat format (default: when it has one)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations; bfloat16 on a GPU")
    p.add_argument("--method", default="laqpp", choices=lqc.method_names(), help="the eviction policy (full: none)")
    p.add_argument("--budget", type=int, default=256, help="kept prompt entries per KV head per layer (> 0)")
    p.add_argument("--window", type=int, default=32,
                   help="observation window (SnapKV, PyramidKV, Ada-KV, LAQ's SnapKV copy) / recent window (H2O); "
                        ">= 1, clamped to --budget")
    p.add_argument("--window-laqpp", type=int, default=8, help="prompt-suffix queries of LAQ++; >= 1, clamped to --budget")
    p.add_argument("--lookahead", type=int, default=8,
                   help="pseudo tokens of LAQ / LAQ++ (>= 1); prompt + this must fit the model's context")
    p.add_argument("--pool", default="max", choices=["max", "avg"], help="1-D pooling of the scores along positions")
    p.add_argument("--pool-kernel", type=int, default=7, help=f"odd, 1 to {lqc.MAX_POOL_KERNEL}; 1 = no pooling")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill forward, > 0 (default: the whole prompt in one causal pass; 512 for padded "
                        "batches and H2O)")
    p.add_argument("--fast", action="store_true", help="decode over a static (fixed-capacity) compacted cache")
    p.add_argument("--compile", action="store_true",
                   help="--fast plus torch.compile of the decode step over FlexAttention, and of prefill's element-wise "
                        "work (RMSNorm, RoPE, SwiGLU; one dynamic graph for every length); compiling is shown apart as "
                        "'compile' in the summary. Pays on a GPU at once; on a CPU (~1.2x faster steps) after ~1,000 "
                        "tokens when inductor's cache is warm, ~8,000 when cold (~2 min)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="LAQ / LAQ++: check the lookahead's pseudo tokens as a draft and keep the accepted ones")
    p.add_argument("--verify", default="none", choices=["none", "full"],
                   help="full: lossless; the compacted cache drafts, the full cache (kept too) verifies")
    p.add_argument("--draft-len", type=int, default=DRAFT_LEN, help="draft tokens per round in --verify full")
    p.add_argument("--cache-limit", type=int, default=None,
                   help="bounded memory: at most this many KV entries per head per layer while decoding (evicts during "
                        "decoding; the prompt's eviction keeps at most this many)")
    p.add_argument("--kv-bits", type=int, default=None, choices=[8],
                   help="8: the decode cache holds int8 K/V (a float32 scale per entry; keys per channel, then per "
                        "token), about 3.8x less memory than float32 at head_dim 64; implies --fast. Default: the "
                        "--dtype")
    p.add_argument("--evict-every", type=int, default=EVICT_EVERY,
                   help="with --cache-limit: entries freed per decode-time eviction (the scoring cost is paid once per "
                        "that many tokens)")
    return p.parse_args(argv)


def read_prompt(prompt, prompt_file, demo) -> str:
    if demo:
        return DEMO_PROMPT
    if prompt is not None:
        return cli.check_utf8(prompt, "--prompt")
    if prompt_file is not None:
        return cli.read_file_text(prompt_file, "--prompt-file")
    if sys.stdin is not None and sys.stdin.isatty():
        return DEMO_PROMPT
    return cli.read_stdin_text()


def check_context(prompt_tokens: int, max_new_tokens: int, cfg: lqc.EvictConfig, limit: int):
    """After tokenizing, before prefill: every position the run will use must exist."""
    if prompt_tokens + max_new_tokens > limit:
        raise BadInput(f"prompt ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's "
                       f"context of {limit}: shorten the prompt or lower --max-new-tokens")
    # the pseudo tokens take the positions the answer will take, after the prompt
    if cfg.looks_ahead and prompt_tokens > cfg.budget and prompt_tokens + cfg.lookahead > limit:
        raise BadInput(f"prompt ({prompt_tokens} tokens) + --lookahead ({cfg.lookahead}) exceeds the model's context "
                       f"of {limit}: lower --lookahead")


def main(ckpt, prompt, prompt_file, demo, answer_prefix, max_new_tokens, temperature, top_k, top_p, seed, chat, device,
         dtype, method, budget, window, window_laqpp, lookahead, pool, pool_kernel, prefill_chunk, fast=False,
         compile=False, reuse=True, verify="none", draft_len=DRAFT_LEN, cache_limit=None, evict_every=EVICT_EVERY,
         kv_bits=None):
    cli.positive("--max-new-tokens", max_new_tokens)
    cli.positive("--prefill-chunk", prefill_chunk)
    cli.positive("--draft-len", draft_len)
    cli.check_sampling(temperature, top_k, top_p, seed)
    notes = []
    cli.positive("--evict-every", evict_every)  # checked with or without --cache-limit, as --draft-len without --verify
    cfg = cli.evict_config(method=method, budget=budget, window=window, window_laqpp=window_laqpp, lookahead=lookahead,
                           kernel=pool_kernel, pool=pool, notes=notes, cache_limit=cache_limit)
    verify = None if verify == "none" else verify  # the CLI's word for run_batch's None
    if cache_limit is not None:
        check_limit(cfg, cache_limit, evict_every, verify, draft=draft_tokens(cfg, reuse, verify, draft_len),
                    kv_bits=kv_bits)
    answer_prefix = cli.check_utf8(answer_prefix, "--answer-prefix")
    if sys.stdout is None:  # started with `>&-`: the answer would go nowhere
        raise cli.CannotWrite("cannot write to stdout: it is closed")
    text = read_prompt(prompt, prompt_file, demo).rstrip()  # a file's or echo's final newline is not part of the question
    if not text.strip():
        raise BadInput("the prompt is empty: give --prompt, --prompt-file, text on stdin, or --demo for the built-in one")
    dev, dt = cli.check_device(device, dtype)
    model, tok = load(ckpt, dev, dt)
    if chat and not tok.chat_format:
        raise cli.BadInput(f"--chat: {ckpt} has no chat template lqc knows (ChatML, Llama 2/3, Phi-3): use --no-chat")
    ids = tok.prompt_ids(text, chat=tok.chat_format is not None if chat is None else chat, answer_prefix=answer_prefix)
    check_context(len(ids), max_new_tokens, cfg, model.args.max_seq_len)
    cli.budget_note(method, budget, len(ids), notes, cache_limit=cache_limit, max_new_tokens=max_new_tokens)
    if compile and not flex_available(dev):
        notes.append(f"FlexAttention is not available on {dev.type}; using dense attention")
    for line in notes:  # all input is checked: what lqc does with it
        cli.note("generate.py", line)
    progress = Progress(sys.stderr is not None and sys.stderr.isatty())
    stream = StreamAfterProgress(Streamer(tok), progress, answer_prefix, compiling=compile)
    then = "compiling the decode step" if compile else "evicting" if method != "full" else "decoding"
    with prefill_progress(model, len(ids), progress, then=f"prefill done; {then} ({method})"):
        out, stats = run(model, ids, cfg, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk,
                         eos_ids=tok.eos_ids, sampling=Sampling(temperature, top_k, top_p, seed), on_token=stream,
                         fast=fast, compile=compile, reuse=reuse, verify=verify, draft_len=draft_len,
                         cache_limit=cache_limit, evict_every=evict_every, kv_bits=kv_bits)
    stream.finish(out)
    cli.write_stdout("\n")
    print(f"[{method}] {stats.line()}", file=sys.stderr)


if __name__ == "__main__":
    cli.exit_on_bad_input("generate.py", main, **vars(parse_args()))
