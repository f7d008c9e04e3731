"""Does eviction keep what decoding needs? Long-context retrieval, attention recall, fidelity.

    python eval.py                                    # the default grid (make eval)
    python eval.py --tasks passkey --lengths 4096 --depths 0.1 0.5 0.9 --budgets 64 128
    python eval.py --data longbench_qasper.jsonl      # LongBench-format JSONL (context/input/answers)
    python eval.py --tasks listing --lengths 1024 --budgets 256 512   # long answers under a cache limit

Per task instance the prompt is prefilled once with the full cache; every method then evicts from
that cache and is scored on:
  acc        greedy answer (after the answer prefix) contains the right answer (LongBench: token F1)
  tf_logp    teacher-forced log-probability of the right answer's tokens (nats, summed)
  tf_top1    share of the right answer's tokens that are the argmax
  recall     share of the attention that the full-cache answer's first decode queries pay to prompt
             keys which falls on the keys the method kept (mean over layers and KV heads)
  agree      greedy tokens equal to the full cache's, as the common prefix / full-cache length (<= 64)
  kl         mean KL(full || method) of next-token distributions, teacher-forced on the full-cache
             continuation
  evict%     eviction time as a share of prefill time
Long answers (--tasks listing, alone): 48 codes in the middle of the prompt, asked back in full
(about 630 tokens of answer with SmolLM2's tokenizer, --answer-tokens 704 by default); each --budgets value is a cache limit (generate.py --cache-limit):
the prompt is evicted to it, then the cache stays within it while --answer-tokens are written.
Scored per method and limit: acc = share of the codes written right, agree (common prefix with the
full cache's answer) and kl (teacher-forced on it, under the limit) over the whole answer, evict% =
decode-time eviction's share of decoding. The first answer token comes from the full-cache prefill
as in generate.py (--first-token does not apply).
First-token mode (--first-token): "redecode" (default) hides the last prompt entry after eviction
and re-runs the last prompt token against the compacted cache, so every answer token depends on
the eviction; "prefill" starts from the full-cache prefill logits, as generate.py does.
"""
from __future__ import annotations

import json
import math
import random
import re
import string
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cli
import ruler
from ruler import take_filler

if __name__ == "__main__":
    cli.quiet_ctrl_c()  # before the slow imports below

import torch

import decoding as D
import lqc
import model as M
from cache_limit import EVICT_EVERY, Evictor
from checkpoint import load
from cli import BadInput
from speculative import DRAFT_LEN
from steps import model_step, sync
from tokenizer import format_chat

# ----------------------------------------------------------------------------------------------
# Tasks, generated offline and deterministically from a seed

_WORDS = ["lantern", "saffron", "compass", "violet", "thimble", "harbor", "meadow", "cobalt", "pepper",
          "marble", "falcon", "quartz", "juniper", "walnut", "ember", "canvas"]
_DISHES = ["the fish stew", "the spring soup", "the plum cake", "the lemon tart", "the bean salad", "the onion pie"]


@dataclass
class Task:
    name: str
    context: str  # the whole user message
    answer_prefix: str  # the reply starts with this
    answer: str  # the right continuation of the prefix
    length: int  # target prompt tokens
    depth: float  # where the fact sits, 0 = start, 1 = end
    needle_char: int = -1  # character offset of the fact in `context`
    answers: tuple = ()  # LongBench: every accepted answer (scored by the best F1)
    values: tuple = ()  # listing: the codes to write back, in order


def task_prompt_ids(tok, task: Task, then: str = "") -> list[int]:
    """The task's prompt as the model sees it: chat format when the tokenizer has one, the answer
    prefix (plus `then`) opening the reply."""
    return tok.prompt_ids(task.context, chat=tok.chat_format is not None, answer_prefix=task.answer_prefix + then)


def _haystack(tok, rng, n_tokens: int, depth: float, needle: str, question: str, prefix: str) -> tuple[str, int]:
    """Filler of about n_tokens prompt tokens with `needle` inserted at `depth` (between sentences)."""
    sents = take_filler(tok, rng, n_tokens - len(tok.encode(needle + " " + question)) - ruler.overhead(tok, prefix, slack=4))
    at = round(depth * len(sents))
    before = " ".join(sents[:at])
    text = (before + " " if before else "") + needle + " " + " ".join(sents[at:])
    return text.strip() + "\n\n" + question, len(before) + (1 if before else 0)


def make_passkey(tok, length, depth, seed) -> Task:
    rng = random.Random(f"passkey-{length}-{depth}-{seed}")
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prefix = "The pass key is "  # numbers tokenize as a lone space then digits: end with that space
    ctx, at = _haystack(tok, rng, length, depth, needle, "What is the pass key?", prefix)
    return Task("passkey", ctx, prefix, key, length, depth, at)


def make_needle(tok, length, depth, seed) -> Task:
    rng = random.Random(f"needle-{length}-{depth}-{seed}")
    dish, word = rng.choice(_DISHES), rng.choice(_WORDS)
    needle = f"The secret ingredient of {dish} is {word}."
    prefix = f"The secret ingredient of {dish} is"
    ctx, at = _haystack(tok, rng, length, depth, needle, f"What is the secret ingredient of {dish}?", prefix)
    return Task("needle", ctx, prefix, f" {word}", length, depth, at)


def make_multikey(tok, length, depth, seed, n_keys=40) -> Task:
    """RULER-style: many key-value lines spread through the filler; the one at `depth` is asked for."""
    rng = random.Random(f"multikey-{length}-{depth}-{seed}")
    keys = ["-".join("".join(rng.choices(string.ascii_lowercase, k=4)) for _ in range(2)) for _ in range(n_keys)]
    values = [str(rng.randint(100000, 999999)) for _ in keys]
    target = min(n_keys - 1, round(depth * (n_keys - 1)))
    lines = [f"The value of key {k} is {v}." for k, v in zip(keys, values)]
    question, prefix = f"What is the value of key {keys[target]}?", f"The value of key {keys[target]} is "
    budget = (length - sum(len(tok.encode(" " + x)) for x in lines) - len(tok.encode(question))
              - ruler.overhead(tok, prefix, slack=4))
    fill = take_filler(tok, rng, budget)
    parts, at = [], -1
    for i, line in enumerate(lines):  # each line followed by an equal share of the filler
        if i == target:
            at = len(" ".join(parts)) + (1 if parts else 0)
        parts += [line] + fill[i * len(fill) // n_keys:(i + 1) * len(fill) // n_keys]
    ctx = " ".join(parts) + "\n\n" + question
    return Task("multikey", ctx, prefix, values[target], length, depth, at)


def make_listing(tok, length, depth, seed, n_items=48) -> Task:
    """Long answer: a list of codes between two halves of filler, asked back in full. Writing it
    takes about 12 tokens a code, so the last codes are needed hundreds of tokens after decoding
    started: with a cache limit, a method must keep the list while the answer grows. `depth` is
    unused (the list sits in the middle)."""
    rng = random.Random(f"listing-{length}-{seed}")
    values = [str(rng.randint(10000, 99999)) for _ in range(n_items)]
    codes = " ".join(f"Code {i + 1} is {v}." for i, v in enumerate(values))
    question = f"Write out all {n_items} codes in order, one per line, as 'Code <number> is <value>.'"
    prefix = "Code 1 is"
    listing = f" Here is the list of codes. {codes} That is the whole list. "
    fill = take_filler(tok, rng, length - len(tok.encode(listing + question)) - ruler.overhead(tok, prefix, slack=4))
    before, after = " ".join(fill[:len(fill) // 2]), " ".join(fill[len(fill) // 2:])
    ctx = f"{before}{listing}{after}\n\n{question}"
    return Task("listing", ctx, prefix, f" {values[0]}.", length, 0.5, len(before) + 1, values=tuple(values))


def listing_score(text: str, values) -> float:
    """Share of the codes written with their right value ("Code k is v"), in any order."""
    got = dict(re.findall(r"Code (\d+) is (\d+)", text))
    return sum(got.get(str(i + 1)) == v for i, v in enumerate(values)) / len(values)


TASKS = {"passkey": make_passkey, "needle": make_needle, "multikey": make_multikey, "listing": make_listing}
LONG_ANSWER = "listing"  # scored per cache limit, with decode-time eviction (evaluate_long_answer)


def load_longbench(path: str, limit: int | None) -> list[Task]:
    """LongBench JSONL, checked line by line before any model work (see `longbench_task`)."""
    tasks = []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = cli.decode_utf8(raw, f"--data {path} line {n}")
                if line.strip():
                    tasks.append(longbench_task(line, f"--data {path} line {n}"))
                if limit and len(tasks) >= limit:
                    break
    except OSError as e:
        raise BadInput(f"cannot read --data: {e.strerror}: {path}") from None
    if not tasks:
        raise BadInput(f"--data {path} holds no examples")
    return tasks


def _encodes(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_text(s) -> bool:
    return isinstance(s, str) and bool(s.strip()) and _encodes(s)  # JSON may escape a lone surrogate


def longbench_task(line: str, where: str) -> Task:
    """One LongBench line: a JSON object with a non-empty string `context`, an optional string
    `input` (the question) and `answers`, a non-empty list of non-empty strings."""
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"{where} is not JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadInput(f"{where} nests too deeply to read (a JSON object of context / input / answers is flat)") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise BadInput(f"{where} cannot be read: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(r, dict):
        raise BadInput(f"{where} is not a JSON object")
    answers, question = r.get("answers"), r.get("input")
    strings = [(n, r.get(n)) for n in ("context", "input")] + [("answers", a) for a in (answers if isinstance(answers, list) else [])]
    for name, value in strings:
        if isinstance(value, str) and not _encodes(value):
            raise BadInput(f"{where}: '{name}' is not valid Unicode (a lone surrogate escape such as \\ud800)")
    if not _is_text(r.get("context")):
        raise BadInput(f"{where}: 'context' must be a non-empty string")
    if question is not None and not (question == "" or _is_text(question)):
        raise BadInput(f"{where}: 'input' must be a string")
    if not (isinstance(answers, list) and answers and all(_is_text(a) for a in answers)):
        raise BadInput(f"{where}: 'answers' must be a non-empty list of non-empty strings")
    ctx = f"{r['context']}\n\nQuestion: {question}" if question else r["context"]
    return Task("longbench", ctx, "", answers[0], 0, float("nan"), answers=tuple(answers))


def normalize(text: str) -> list[str]:
    """LongBench / SQuAD normalisation: lower case, no punctuation or articles, split on spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1_score(prediction: str, truth: str) -> float:
    p, t = normalize(prediction), normalize(truth)
    common = sum(min(p.count(w), t.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# Metrics

def hide_last_prompt_entry(cache, L: int):
    """Redecode mode: hide the entry of the last prompt token (position L-1); it is re-run
    against the compacted cache, so the first answer token depends on the eviction too."""
    out = cache.clone()
    out.pos = [torch.where(p == L - 1, -1, p) for p in out.pos]
    return out


def continuation_logits(model, cache, first_logits, last_tok: int, tokens: list[int], L: int, mode: str):
    """Next-token logits `[n, V]` predicting tokens[0..n-1], teacher-forced, on a copy of `cache`
    (one row; `continuation_rows` for a batch)."""
    return continuation_rows(model, cache, first_logits, last_tok, tokens, L, mode)[0]


def continuation_rows(model, cache, first_logits, last_tok: int, tokens: list[int], L: int, mode: str):
    """The same tokens teacher-forced on every row of a batched cache (all rows' prompts L long):
    logits `[B, n, V]`; first_logits `[1 or B, V]` are the prefill's."""
    dev, B = first_logits.device, cache.k[0].shape[0]
    if mode == "redecode":
        cache = hide_last_prompt_entry(cache, L)
        feed, start, head = [last_tok] + tokens[:-1], L - 1, []
    else:
        cache = cache.clone()
        feed, start, head = tokens[:-1], L, [first_logits.expand(B, -1)[:, None]]
    if not feed:
        return torch.cat(head, 1)
    x = torch.tensor([feed], device=dev).expand(B, -1)
    out = model(x, torch.arange(start, start + len(feed), device=dev).expand(B, -1), cache)  # [B, n', V]
    return torch.cat(head + [out], 1)


def greedy(model, cache, first_logits, last_tok: int, L: int, mode: str, n: int, eos_ids) -> list[int]:
    return greedy_rows(model, cache, first_logits, last_tok, L, mode, n, eos_ids)[0]


def greedy_rows(model, cache, first_logits, last_tok: int, L: int, mode: str, n: int, eos_ids) -> list[list[int]]:
    """Greedy answers of every row of a batched cache (prompts L long, the same last token), each
    as it would be alone; on a copy of the cache."""
    dev, B = first_logits.device, cache.k[0].shape[0]
    if mode == "redecode":
        cache = hide_last_prompt_entry(cache, L)
        logits = model(torch.tensor([[last_tok]], device=dev).expand(B, 1), torch.full((B, 1), L - 1, device=dev),
                       cache)[:, -1]
    else:
        cache, logits = cache.clone(), first_logits.expand(B, -1)
    return D.decode(model, cache, logits, torch.full((B,), L, device=dev), max_new_tokens=n, eos_ids=eos_ids)


def attention_recall(ref_mass: list[torch.Tensor], indices) -> float:
    """Share of the reference attention mass `[B, H_kv, L]` per layer on the kept indices."""
    if indices is None:
        return 1.0
    shares = []
    for mass, idx in zip(ref_mass, indices):
        L = mass.shape[-1]
        kept = mass.gather(2, idx.clamp(max=L - 1)) * (idx < L)
        shares.append(kept.sum(-1) / mass.sum(-1))  # [B, H_kv]
    return torch.stack(shares).mean().item()


def evict_config(args, method: str, budget: int) -> lqc.EvictConfig:
    """The flags' config, with the window rule (notes on it are printed once, by main)."""
    return cli.evict_config(method=method, budget=budget, window=args.window, window_laqpp=args.window_laqpp,
                            lookahead=args.lookahead, kernel=args.pool_kernel, pool=args.pool)


def reference_mass(model, pre, cont: list[int], L: int, n_queries: int) -> list[torch.Tensor]:
    """Attention that the full-cache answer's first n decode queries pay to the prompt keys."""
    dev = pre.obs.logits.device
    toks = cont[:n_queries] or [pre.obs.logits.argmax(-1).item()]
    cache = pre.cache.clone()
    pos = torch.arange(L, L + len(toks), device=dev)[None]
    _, qs = model(torch.tensor([toks], device=dev), pos, cache, return_queries=True)
    return [lqc.attention_mass(q, cache.k[l], pos, cache.pos[l])[..., :L] for l, q in enumerate(qs)]


def draft_acceptance(matches: list[bool], k: int) -> float:
    """Share of the compacted cache's draft tokens that the full cache accepts in verify mode (greedy,
    k a round), from whether the compacted cache's greedy choice equals the full cache's at each
    position of the full cache's answer, teacher-forced: inside an accepted prefix the draft saw
    exactly the full cache's tokens, so these matches replay every round."""
    i = drafted = accepted = 0
    while i < len(matches) - 1:
        k_round = min(k, len(matches) - 1 - i)  # the last token is always the full cache's own
        n = next((j for j in range(k_round) if not matches[i + j]), k_round)
        drafted, accepted, i = drafted + k_round, accepted + n, i + n + 1
    return accepted / drafted if drafted else 1.0


def kl_mean(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def needs_mass(methods) -> bool:
    """Whether a method among these reads the attention mass of every prompt query (H2O)."""
    return any(lqc.METHODS[m].needs_mass for m in methods if m in lqc.METHODS)


def query_window(args, methods) -> int:
    """Trailing prompt queries prefill must keep for every method compared (windows as given: the
    window rule only ever shrinks them)."""
    return max(lqc.EvictConfig(method=m, window=args.window, window_laqpp=args.window_laqpp).obs_window for m in methods)


def with_h2o_mass(model, x, pre, methods, chunk) -> D.Prefill:
    """pre, with the attention mass of every prompt query when a method needs it (H2O): it comes
    from a second, instrumented prefill (the first one stays as fast as generate.py's)."""
    if not needs_mass(methods):
        return pre
    return D.Prefill(pre.cache, replace(pre.obs, mass=D.prefill(model, x, chunk=chunk, h2o=True).obs.mass))


@torch.no_grad()
def evaluate_task(model, tok, task: Task, methods, budgets, args) -> list[dict]:
    """Prefill once, then score every method and budget against the full cache."""
    ids = task_prompt_ids(tok, task)
    with_answer = task_prompt_ids(tok, task, task.answer)
    answer_ids = with_answer[len(ids):] if with_answer[:len(ids)] == ids else tok.encode(task.answer)
    room = model.args.max_seq_len - args.agree_tokens - len(answer_ids)
    cut_from = len(ids) if len(ids) > room else None
    if cut_from:  # as LongBench does: cut the middle, keep both ends (and the chat format); main notes it
        ids = ids[:room // 2] + ids[len(ids) - (room - room // 2):]
    L, dev = len(ids), model.tok_embeddings.weight.device
    x = torch.tensor([ids], device=dev)
    t0 = time.perf_counter()
    pre = D.prefill(model, x, chunk=args.prefill_chunk, keep_queries=query_window(args, methods))
    sync(dev)  # CUDA: the GPU's time, not the launches'
    prefill_s = time.perf_counter() - t0
    pre = with_h2o_mass(model, x, pre, methods, args.prefill_chunk)
    last = ids[-1]
    full_cont = greedy(model, pre.cache, pre.obs.logits, last, L, args.first_token, args.agree_tokens, tok.eos_ids)
    full_tf = continuation_logits(model, pre.cache, pre.obs.logits, last, full_cont or [tok.eos_ids[0]], L, args.first_token)
    ref = reference_mass(model, pre, full_cont, L, args.recall_queries)
    rows = []
    for method in methods:
        for budget in ([budgets[-1]] if method == "full" else budgets):
            cfg = evict_config(args, method, budget)
            t1 = time.perf_counter()
            cache, indices = D.evict(cfg, model, pre, eos_ids=tok.eos_ids)
            sync(dev)
            evict_s = time.perf_counter() - t1
            out = greedy(model, cache, pre.obs.logits, last, L, args.first_token, args.agree_tokens, tok.eos_ids)
            text = tok.decode(out)
            tf = continuation_logits(model, cache, pre.obs.logits, last, answer_ids, L, args.first_token).log_softmax(-1)
            ans = torch.tensor(answer_ids, device=dev)
            cont_tf = continuation_logits(model, cache, pre.obs.logits, last, full_cont or [tok.eos_ids[0]], L, args.first_token)
            matches = (cont_tf.argmax(-1).cpu() == torch.tensor(full_cont or [tok.eos_ids[0]])).tolist()
            acc = max(f1_score(text, a) for a in task.answers) if task.answers else float(task.answer.strip() in text)
            rows.append(dict(task=task.name, length=task.length, prompt_tokens=L, depth=task.depth, method=method,
                             budget=budget if method != "full" else L, acc=acc,
                             tf_logp=tf.gather(1, ans[:, None]).sum().item(),
                             tf_top1=(tf.argmax(-1) == ans).float().mean().item(),
                             recall=attention_recall(ref, indices), agree=prefix_agreement(out, full_cont),
                             kl=kl_mean(full_tf, cont_tf), accept=draft_acceptance(matches, args.draft_len),
                             evict_share=evict_s / prefill_s,
                             prefill_s=prefill_s, evict_s=evict_s, output=text[:200], first_token=args.first_token,
                             cut_from=cut_from))
    return rows


def limited(model, cfg: lqc.EvictConfig, pre, cache, *, limit: int, every: int):
    """An `Evictor` that keeps `cache` (the prompt's, evicted to the limit) within the limit while
    decoding, as `generate.py --cache-limit` does."""
    return Evictor(cfg, cache, limit=limit, every=every, step=model_step(model), obs=pre.obs, prompt_pos=pre.cache.pos)


def forced_limited_logits(cache, evictor, *, first_logits, tokens: list[int], next_pos: int) -> torch.Tensor:
    """Next-token logits `[n, V]` predicting tokens (n of them), teacher-forced one token a step
    with the cache kept within the limit (each step's entry may evict, as in free decoding);
    first_logits `[1, V]` predict tokens[0], the rest start at position next_pos."""
    dev, out = first_logits.device, [first_logits[0]]
    for i, t in enumerate(tokens[:-1]):
        evictor(cache, 1)
        out.append(evictor.step(torch.tensor([[t]], device=dev), torch.tensor([[next_pos + i]], device=dev), cache)[0][0])
    return torch.stack(out)


def prefix_agreement(out: list[int], ref: list[int]) -> float:
    """Common prefix of out and the full cache's tokens ref, over len(ref) + 1: the full cache's EOS
    (or cut) counts as a token to agree on, so an empty ref agrees with an empty out."""
    ref_seq = ref + [-1]
    return next((i for i, (a, b) in enumerate(zip(out + [-1], ref_seq)) if a != b), len(ref_seq)) / len(ref_seq)


@torch.no_grad()
def evaluate_long_answer(model, tok, task: Task, methods, limits, args) -> list[dict]:
    """A long answer under a cache limit: per method and limit, the codes written right (acc), the
    common prefix of the greedy answer with the full cache's (agree, over --answer-tokens), the mean
    KL to the full cache teacher-forced on its answer, and decode-time eviction's share of decoding.
    The first answer token comes from the full-cache prefill, as in generate.py (--first-token
    does not apply)."""
    ids = task_prompt_ids(tok, task)
    L, dev = len(ids), model.tok_embeddings.weight.device
    x = torch.tensor([ids], device=dev)
    pre = D.prefill(model, x, chunk=args.prefill_chunk, keep_queries=query_window(args, methods))
    pre = with_h2o_mass(model, x, pre, methods, args.prefill_chunk)
    n, eos = args.answer_tokens, tok.eos_ids
    t0 = time.perf_counter()
    full_out = D.decode(model, pre.cache.clone(), pre.obs.logits, pre.obs.next_pos, max_new_tokens=n, eos_ids=eos)[0]
    sync(dev)
    full_s = time.perf_counter() - t0
    forced = full_out or [eos[0]]  # teacher-forced: at least one token to predict
    full_tf = continuation_logits(model, pre.cache, pre.obs.logits, ids[-1], forced, L, "prefill")  # [n, V]
    rows = []
    for method in methods:
        for limit in ([limits[-1]] if method == "full" else limits):
            if method == "full":
                out, tf, evict_share = full_out, full_tf, 0.0
            else:
                cfg = evict_config(args, method, limit)
                prompt_cache, indices = D.evict(cfg, model, pre, eos_ids=eos)
                # two runs from the same evicted prompt (nothing evicted: the prefill's own cache, kept for the next method)
                cache = prompt_cache.clone()
                evictor = limited(model, cfg, pre, cache, limit=limit, every=args.evict_every)
                t0 = time.perf_counter()
                out = D.decode(model, cache, pre.obs.logits, pre.obs.next_pos, max_new_tokens=n, eos_ids=eos,
                               step=evictor.step, evictor=evictor)[0]
                sync(dev)
                evict_share = evictor.seconds / (time.perf_counter() - t0)
                cache = prompt_cache if indices is not None else prompt_cache.clone()
                evictor = limited(model, cfg, pre, cache, limit=limit, every=args.evict_every)
                tf = forced_limited_logits(cache, evictor, first_logits=pre.obs.logits, tokens=forced, next_pos=L)
            text = task.answer_prefix + tok.decode(out)
            rows.append(dict(task=task.name, length=task.length, prompt_tokens=L, method=method,
                             budget=limit if method != "full" else L, acc=listing_score(text, task.values),
                             agree=prefix_agreement(out, full_out), kl=kl_mean(full_tf, tf), evict_share=evict_share,
                             new_tokens=len(out), full_decode_s=full_s, output=text[:400]))
    return rows


# ----------------------------------------------------------------------------------------------
# The RULER-style suite (ruler.py): one prefill per prompt; every method and budget evicts from it
# and all of them decode together as one batch (each row as it would alone)

def suite_grid(methods, budgets) -> list[tuple[str, int]]:
    return [(m, b) for m in methods if m != "full" for b in budgets]


@torch.no_grad()
def evaluate_sample(model, tok, s: ruler.Sample, methods, budgets, args) -> list[dict]:
    """Prefill once (with H2O's attention mass when H2O is compared), decode the full cache's answer,
    then every (method, budget) row: eviction, greedy answer (batched), and the full cache's answer
    teacher-forced (batched) for KL, agreement and draft acceptance."""
    ids = task_prompt_ids(tok, s)
    L, dev, eos = len(ids), model.tok_embeddings.weight.device, tok.eos_ids
    t0 = time.perf_counter()
    pre = D.prefill(model, torch.tensor([ids], device=dev), chunk=args.prefill_chunk, h2o=needs_mass(methods),
                    keep_queries=query_window(args, methods))
    sync(dev)
    prefill_s, last, mode = time.perf_counter() - t0, ids[-1], args.first_token
    full_out = greedy(model, pre.cache, pre.obs.logits, last, L, mode, s.max_new, eos)
    forced = full_out or [eos[0]]
    full_tf = continuation_logits(model, pre.cache, pre.obs.logits, last, forced, L, mode)  # [n, V]
    ref = reference_mass(model, pre, full_out, L, args.recall_queries)
    base = dict(task=s.name, length=s.length, prompt_tokens=L, depth=s.depth, haystack=s.haystack, seed=s.seed,
                prefill_s=prefill_s, h2o_prefill=needs_mass(methods), first_token=mode)
    rows = [base | suite_row(tok, s, "full", L, full_out, full_out, None, 1.0, 0.0)] if "full" in methods else []
    grid = suite_grid(methods, budgets)
    if not grid:
        return rows
    caches, kept, seconds = [], [], []
    for m, b in grid:
        t1 = time.perf_counter()
        cache, indices = D.evict(evict_config(args, m, b), model, pre, eos_ids=eos)
        sync(dev)
        seconds.append(time.perf_counter() - t1)
        caches.append(cache)
        kept.append(indices)
    batch = M.KVCache.stack(caches)
    del caches
    outs = greedy_rows(model, batch, pre.obs.logits, last, L, mode, s.max_new, eos)
    tf = continuation_rows(model, batch, pre.obs.logits, last, forced, L, mode)  # [R, n, V]
    want = torch.tensor(forced)
    for r, (m, b) in enumerate(grid):
        matches = (tf[r].argmax(-1).cpu() == want).tolist()
        rows.append(base | suite_row(tok, s, m, b, outs[r], full_out, matches, attention_recall(ref, kept[r]),
                                     kl_mean(full_tf, tf[r]), args.draft_len) | dict(evict_s=seconds[r],
                                                                                     evict_share=seconds[r] / prefill_s))
    return rows


def suite_row(tok, s, method, budget, out, full_out, matches, recall, kl, draft_len=1) -> dict:
    text = tok.decode(out)
    return dict(method=method, budget=budget, acc=ruler.score(text, s.expected), recall=recall,
                agree=prefix_agreement(out, full_out), kl=kl,
                accept=1.0 if matches is None else draft_acceptance(matches, draft_len), evict_s=0.0, evict_share=0.0,
                output=text[:300])


def sample_key(s: ruler.Sample) -> str:
    return f"{s.name}|{s.length}|{s.depth}|{s.seed}|{s.haystack}"


def suite_config(args) -> dict:
    """What makes two runs' rows comparable: a rerun into the same --out must agree on all of it."""
    keys = ("ckpt", "methods", "budgets", "first_token", "window", "window_laqpp", "lookahead", "pool", "pool_kernel",
            "recall_queries", "draft_len", "dtype")
    return {k: getattr(args, k) for k in keys}


def read_done(path: Path, config: dict) -> dict:
    """{sample key: rows} already in results.jsonl (one line per prompt, appended as each finishes).
    A last line cut short by a kill is dropped (the file is cut back to its last whole line)."""
    done = {}
    for n, line in enumerate(cli.whole_lines(path), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise BadInput(f"{path} line {n} is not JSON: not a results file of eval.py; use another --out") from None
        if "config" in rec and rec["config"] != config:
            diff = sorted(k for k in config if rec["config"].get(k) != config[k])
            raise BadInput(f"{path} holds a run with other settings ({', '.join(diff)}): rerun with the same flags to "
                           "continue it, or choose another --out (or --overwrite)")
        if "key" in rec:
            done[rec["key"]] = rec["rows"]
    return done


class Clock:
    """Progress and the --minutes budget: seconds per prompt measured per length (a length not seen
    yet is estimated from the others, prefill growing about as length^1.5)."""

    def __init__(self, minutes: float | None):
        self.start, self.limit = time.perf_counter(), None if minutes is None else 60 * minutes
        self.seconds: dict[int, list[float]] = defaultdict(list)

    def estimate(self, length: int) -> float | None:
        if self.seconds.get(length):
            return sum(self.seconds[length]) / len(self.seconds[length])
        known = [(n, sum(v) / len(v)) for n, v in self.seconds.items() if v]
        return None if not known else sum(t * (length / n) ** 1.5 for n, t in known) / len(known)

    def fits(self, length: int) -> bool:
        est = self.estimate(length) or 0.0
        return self.limit is None or self.elapsed() + est <= self.limit

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, lengths: list[int]) -> float:
        return sum(self.estimate(n) or 0.0 for n in lengths)


def run_suite(model, tok, args, out: Path, samples: list) -> list[dict]:
    """Every sample not in --out yet, in order, until done or --minutes is spent; progress on stderr."""
    path, config = out / "results.jsonl", suite_config(args)
    done = read_done(path, config)
    if not path.exists():
        cli.append_line(path, {"config": config})
    todo = [s for s in samples if sample_key(s) not in done]
    rows = [r for rs in done.values() for r in rs]
    if done:
        print(f"eval.py: {len(samples) - len(todo)} of {len(samples)} prompts are done in {path}; "
              f"running the other {len(todo)}", file=sys.stderr)
    clock = Clock(args.minutes)
    for i, s in enumerate(todo):
        if not clock.fits(s.length):
            print(f"eval.py: note: stopped after {i} of {len(todo)} prompts (--minutes {args.minutes:g}): "
                  "rerun the same command to continue", file=sys.stderr)
            break
        t0 = time.perf_counter()
        new = evaluate_sample(model, tok, s, args.methods, sorted(args.budgets), args)
        clock.seconds[s.length].append(time.perf_counter() - t0)
        cli.append_line(path, {"key": sample_key(s), "rows": new})
        rows += new
        full = next((r["acc"] for r in new if r["method"] == "full"), float("nan"))
        print(f"eval.py: [{i + 1}/{len(todo)}] {s.name} {s.length} tok ({new[0]['prompt_tokens']}): "
              f"{clock.seconds[s.length][-1]:.0f} s, full cache {full:.2f}; elapsed {clock.elapsed() / 60:.1f} min, "
              f"left ~{clock.eta([t.length for t in todo[i + 1:]]) / 60:.0f} min", file=sys.stderr, flush=True)
    return rows


def suite_summary(rows: list[dict]) -> dict:
    """{(length, task or 'all', method, budget): means, n and the Wilson interval of acc}."""
    groups = defaultdict(list)
    for r in rows:
        b = "full" if r["method"] == "full" else r["budget"]
        for task in (r["task"], "all"):
            groups[(r["length"], task, r["method"], b)].append(r)
    out = {}
    for k, v in groups.items():
        means = {m: sum(r[m] for r in v) / len(v) for m in ("acc", "recall", "agree", "kl", "accept", "evict_share")}
        lo, hi = ruler.wilson(means["acc"] * len(v), len(v))
        out[k] = means | {"n": len(v), "lo": lo, "hi": hi}
    return out


def suite_tables(summary: dict, methods, budgets, tasks) -> str:
    """Per length: a row per method and budget, the suite's accuracy with its 95% interval, each
    task's accuracy, and the model-free columns."""
    blocks = []
    for length in sorted({k[0] for k in summary}):
        head = ["method", "budget", "n", "suite acc [95% CI]", *tasks, "KL", "agree", "draft accept", "evict % of prefill"]
        lines = [f"**{length} tokens**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            for b in (["full"] if m == "full" else budgets):
                a = summary.get((length, "all", m, b))
                if not a:
                    continue
                per_task = [f"{summary[(length, t, m, b)]['acc']:.2f}" if (length, t, m, b) in summary else "-"
                            for t in tasks]
                lines.append(f"| {m} | {b} | {a['n']} | {a['acc']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] | "
                             + " | ".join(per_task) + f" | {a['kl']:.3f} | {a['agree']:.2f} | {a['accept']:.2f} | "
                             f"{100 * a['evict_share']:.1f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_suite(summary, methods, budgets, caption: str, at_budget: int, path: Path):
    """Left: suite accuracy vs budget, one panel per length; right: accuracy vs length at one budget;
    shaded: the 95% Wilson interval."""
    plt = pyplot()
    lengths = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(4.2 * (len(lengths) + 1), 4), squeeze=False)
    curves = [m for m in methods if m != "full"]
    for ax, n in zip(axes[0], lengths):
        for k, m in enumerate(curves):
            pts = [(b, summary[(n, "all", m, b)]) for b in budgets if (n, "all", m, b) in summary]
            draw_curve(ax, m, pts, k, len(curves))
        full = summary.get((n, "all", "full", "full"))
        if full:
            ax.axhline(full["acc"], color="k", ls="--", label="full cache")
            ax.axhspan(full["lo"], full["hi"], color="k", alpha=0.06)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_title(f"{n} tokens", fontsize=9)
        ax.set_xlabel("budget (kept entries per KV head per layer)", fontsize=8)
    ax = axes[0][-1]
    for k, m in enumerate(methods):
        b = "full" if m == "full" else at_budget
        draw_curve(ax, m, [(n, summary[(n, "all", m, b)]) for n in lengths if (n, "all", m, b) in summary],
                   k, len(methods))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_title(f"budget {at_budget}", fontsize=9)
    ax.set_xlabel("context length (tokens)", fontsize=8)
    for a in axes[0]:
        a.set_ylim(-0.02, 1.02)
        a.grid(alpha=0.3)
    axes[0][0].set_ylabel("suite accuracy (share of expected strings)")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"RULER-style suite: accuracy vs budget and vs length ({caption})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_curve(ax, method: str, pts: list, k: int = 0, n: int = 1):
    """One method's points with their 95% intervals as error bars, dodged sideways (the k-th of n
    curves), so equal points and overlapping intervals stay readable."""
    if not pts:
        return
    color, marker, ls = style(method)
    dodge = 2 ** (0.04 * (k - (n - 1) / 2))
    xs = [x * dodge for x, _ in pts]
    acc = [p["acc"] for _, p in pts]
    err = [[a - p["lo"] for a, (_, p) in zip(acc, pts)], [p["hi"] - a for a, (_, p) in zip(acc, pts)]]
    ax.errorbar(xs, acc, yerr=err, color=color, marker=marker, ls=ls or "-", markerfacecolor="none", capsize=2,
                elinewidth=0.8, alpha=0.9, label=label(method))


def label(method: str) -> str:
    return "full cache" if method == "full" else lqc.METHODS[method].label


# ----------------------------------------------------------------------------------------------
# Reporting

METRICS = ("acc", "tf_logp", "tf_top1", "recall", "agree", "kl", "accept", "evict_share")


def summarize(rows: list[dict], metrics=METRICS) -> dict:
    """Mean of each metric per (method, budget); full cache under budget 'full'."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], "full" if r["method"] == "full" else r["budget"])].append(r)
    return {k: {m: sum(r[m] for r in v) / len(v) for m in metrics} | {"n": len(v)} for k, v in groups.items()}


LONG_METRICS = ("acc", "agree", "kl", "evict_share")


def long_answer_table(summary: dict, methods, limits) -> str:
    lines = ["| method | cache limit | n | codes right | agree | KL | eviction % of decode |", "|" + "---|" * 7]
    for m in methods:
        for b in (["full"] if m == "full" else limits):
            s = summary.get((m, b))
            if s:
                lines.append(f"| {m} | {'none' if b == 'full' else b} | {s['n']} | {s['acc']:.2f} | {s['agree']:.2f} | "
                             f"{s['kl']:.3f} | {100 * s['evict_share']:.1f} |")
    return "\n".join(lines)


def markdown_table(summary: dict, methods, budgets) -> str:
    head = "| method | budget | n | acc | tf_logp | tf_top1 | recall | agree | KL | draft accept | evict % of prefill |"
    lines = [head, "|" + "---|" * 11]
    for m in methods:
        for b in (["full"] if m == "full" else budgets):
            s = summary.get((m, b))
            if s:
                lines.append(f"| {m} | {b} | {s['n']} | {s['acc']:.2f} | {s['tf_logp']:.2f} | {s['tf_top1']:.2f} | "
                             f"{s['recall']:.3f} | {s['agree']:.2f} | {s['kl']:.3f} | {s['accept']:.2f} | "
                             f"{100 * s['evict_share']:.1f} |")
    return "\n".join(lines)


FULL_STYLE = ("k", "", "--")  # the full cache: a dashed black line; each method's look is in its lqc.METHODS entry


def style(method: str) -> tuple:
    """(color, marker, line style): lines that lie on each other stay apart by marker and style."""
    return FULL_STYLE if method == "full" else lqc.METHODS[method].style


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_caption(args, n_prompts: int) -> str:
    """What a figure was measured on, for its title: the model, the prompts and how many."""
    if args.data:
        what = Path(args.data).name
    else:
        what = f"{', '.join(args.tasks)} at {', '.join(map(str, args.lengths))} tokens"
    return f"{args.ckpt}, {what}: n = {n_prompts} prompts"


LABELS = {"acc": "accuracy", "recall": "attention recall", "agree": "agreement with the full cache"}


def plot_accuracy(summary, methods, budgets, caption: str, path: Path, metrics=("acc", "recall"),
                  xlabel="budget (kept entries per KV head per layer)"):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    curves = [m for m in methods if m != "full"]
    for ax, metric in zip(axes, metrics):
        for k, m in enumerate(curves):
            color, marker, ls = style(m)
            dodge = 2 ** (0.03 * (k - (len(curves) - 1) / 2))  # equal points side by side, not on top
            ax.plot([b * dodge for b in budgets], [summary[(m, b)][metric] for b in budgets], color=color, ls=ls,
                    marker=marker, markersize=8, markerfacecolor="none", markeredgewidth=1.5, label=label(m))
        if "full" in methods:
            ax.axhline(summary[("full", "full")][metric], color="k", ls="--", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    names = [LABELS.get(m, m) for m in metrics]
    fig.suptitle(f"{' and '.join(names).capitalize()} vs {xlabel.split(' (')[0]} ({caption})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmaps(rows, methods, budget, caption: str, path: Path):
    plt = pyplot()
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(methods), figsize=(1.2 + 1.6 * len(methods), 3.2), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                sel = [r["acc"] for r in rows if r["method"] == m and r["depth"] == d and r["length"] == n
                       and (m == "full" or r["budget"] == budget)]
                if sel:
                    grid[i, j] = sum(sel) / len(sel)
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                v = grid[i, j].item()
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9)
        ax.set_title(m if m == "full" else f"{m} @ {budget}", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=8)
    axes[0][0].set_ylabel("depth of the fact (0 = start)", fontsize=8)
    fig.supxlabel("context length (tokens)", fontsize=9)
    fig.suptitle(f"Accuracy per length and depth at budget {budget} ({caption})", fontsize=10)
    fig.tight_layout()
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", fraction=0.02, pad=0.01)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def label_layers(ax, n_layers: int, n_heads: int):
    """Rows are layer x KV head: a tick per few layers, at the layer's first head."""
    every = max(1, n_layers // 5)
    ax.set_yticks([l * n_heads for l in range(0, n_layers, every)], [str(l) for l in range(0, n_layers, every)],
                  fontsize=7)
    ax.set_ylabel("layer", fontsize=8)


@torch.no_grad()
def plot_kept(model, tok, task: Task, methods, budget, args, path: Path):
    """Which prompt positions each layer and KV head kept, per method, for one example."""
    plt = pyplot()
    ids = task_prompt_ids(tok, task)
    L, dev = len(ids), model.tok_embeddings.weight.device
    x = torch.tensor([ids], device=dev)
    methods = [m for m in methods if m != "full"]
    fig, axes = plt.subplots(len(methods), 1, figsize=(10, 0.6 + 1.6 * len(methods)), squeeze=False)
    for ax, m in zip(axes[:, 0], methods):
        pre = D.prefill(model, x, chunk=args.prefill_chunk, keep_queries=query_window(args, [m]),
                        h2o=needs_mass([m]))
        _, indices = D.evict(evict_config(args, m, budget), model, pre, eos_ids=tok.eos_ids)
        rows = torch.zeros(len(indices) * indices[0].shape[1], L)
        for l, idx in enumerate(indices):
            for h in range(idx.shape[1]):
                keep = idx[0, h][idx[0, h] < L]
                rows[l * idx.shape[1] + h, keep.cpu()] = 1
        ax.imshow(rows.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
        if task.needle_char >= 0:  # mark the fact: the tokens of the prompt text before it
            text = format_chat(tok.chat_format, task.context, tok.system_prompt) if tok.chat_format else task.context
            ax.axvline(len(tok.encode(text[: text.index(task.context) + task.needle_char])), color="red", lw=0.8)
        ax.set_title(m, fontsize=9, loc="left")
        label_layers(ax, len(indices), indices[0].shape[1])
    axes[-1, 0].set_xlabel("prompt position (red line: the fact)")
    fig.suptitle(f"Prompt positions kept (black) per layer and KV head, budget {budget}: one {task.name} prompt of "
                 f"{L} tokens, {args.ckpt}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line

OUTPUTS = ["results.json", "results.md", "accuracy_vs_budget.png", "heatmap.png", "kept.png"]
GENERATED = dict(tasks=["passkey", "needle", "multikey"], lengths=[1024, 2048], depths=[0.25, 0.75], seeds=1)
SUITE = dict(tasks=list(ruler.SUITE), lengths=[4096, 8192, 16384], depths=[0.1, 0.3, 0.5, 0.7, 0.9], seeds=2)


def parse_args(argv=None):
    p = cli.ArgParser(description="Evaluate KV-cache eviction methods on long-context retrieval and fidelity. "
                                  + cli.WINDOW_RULE + " Bad input ends with one line on stderr and exit code 2.")
    p.add_argument("--ckpt", default="smollm2", help="short name, .gguf file, HF directory or hub id")
    p.add_argument("--suite", choices=["ruler"],
                   help="the RULER-style suite (ruler.py): " + ", ".join(ruler.SUITE) + "; scored as RULER does (share "
                        f"of expected strings found), accuracy with 95%% Wilson intervals; defaults: lengths "
                        f"{' '.join(map(str, SUITE['lengths']))}, depths {' '.join(map(str, SUITE['depths']))}, seeds "
                        f"{SUITE['seeds']}; results.jsonl grows a line per prompt and a rerun into the same --out continues")
    p.add_argument("--tasks", nargs="+", choices=[*TASKS, *ruler.SUITE],
                   help=f"default: {' '.join(GENERATED['tasks'])} (with --suite: all of the suite)")
    p.add_argument("--data", help="LongBench-format UTF-8 JSONL (context / input / answers) instead of generated tasks")
    p.add_argument("--limit", type=int, default=None, help="at most this many JSONL examples (with --data)")
    p.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens (default: 1024 2048)")
    p.add_argument("--depths", nargs="+", type=float, help="where the fact sits, in [0, 1] (default: 0.25 0.75)")
    p.add_argument("--seeds", type=int, help="instances per task x length x depth (default: 1); with --suite, per task "
                                             "x length, the depths and the two haystacks taking turns")
    p.add_argument("--minutes", type=float, help="--suite: start no prompt that would end after this many minutes "
                                                "(measured per length); rerun the same command to continue")
    p.add_argument("--methods", nargs="+", default=list(lqc.method_names()), choices=lqc.method_names(), help="methods to compare")
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256], help="kept entries per KV head per layer")
    p.add_argument("--first-token", default="redecode", choices=["redecode", "prefill"],
                   help="redecode: the last prompt token is re-run on the evicted cache (see the top of eval.py)")
    p.add_argument("--agree-tokens", type=int, default=64, help="greedy tokens compared with the full cache's")
    p.add_argument("--answer-tokens", type=int, default=704,
                   help=f"--tasks {LONG_ANSWER}: tokens of the long answer (its --budgets are cache limits)")
    p.add_argument("--evict-every", type=int, default=EVICT_EVERY,
                   help=f"--tasks {LONG_ANSWER}: entries freed per decode-time eviction")
    p.add_argument("--recall-queries", type=int, default=16, help="decode queries whose attention defines recall")
    p.add_argument("--draft-len", type=int, default=DRAFT_LEN,
                   help="draft tokens per round for the verify-mode acceptance rate (the compacted cache drafts)")
    p.add_argument("--window", type=int, default=32, help="observation window (SnapKV family, LAQ's copy) / recent window (H2O)")
    p.add_argument("--window-laqpp", type=int, default=8, help="prompt-suffix queries of LAQ++")
    p.add_argument("--lookahead", type=int, default=8, help="pseudo tokens of LAQ / LAQ++")
    p.add_argument("--pool", default="max", choices=["max", "avg"], help="1-D pooling of the scores along positions")
    p.add_argument("--pool-kernel", type=int, default=7, help="odd; 1 = no pooling")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="tokens per prefill forward (default: the whole prompt in one causal pass; 512 for padded "
                        "batches and H2O)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    p.add_argument("--out", default="out/eval", help="folder for results.json, results.md and figures (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the results and figures of an earlier run in --out")
    p.add_argument("--plot-kept", action="store_true", help="also draw which positions each layer and head kept")
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    """Every flag, before any model work; the generated tasks' flags get their defaults here (they
    do not apply to --data). Returns the notes on what lqc does with the windows."""
    given = [f"--{k}" for k in GENERATED if getattr(args, k) is not None]
    if args.data and (given or args.plot_kept):
        raise BadInput(f"{' '.join(given) or '--plot-kept'} do not apply to --data (generated tasks only)")
    if args.data and (args.suite or args.minutes is not None):
        raise BadInput(f"{'--suite' if args.suite else '--minutes'} does not apply to --data")
    if args.limit is not None and not args.data:
        raise BadInput("--limit applies to --data only")
    in_suite = [t in ruler.SUITE for t in args.tasks or []]
    if any(in_suite) and not all(in_suite):
        raise BadInput("--tasks mixes the suite's tasks with the others: they are scored differently, run them apart")
    args.suite = args.suite or ("ruler" if any(in_suite) else None)
    if args.minutes is not None and not args.suite:
        raise BadInput("--minutes applies to --suite only")
    if args.minutes is not None and not 0 < args.minutes < 1e6:
        raise BadInput(f"--minutes must be a positive number of minutes (got {args.minutes:g})")
    for k, v in (SUITE if args.suite else GENERATED).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    cli.positive("--lengths", *args.lengths)
    cli.positive("--budgets", *args.budgets)
    if any(not 0 <= d <= 1 for d in args.depths):
        raise BadInput(f"--depths must lie in [0, 1] (got {' '.join(map(str, args.depths))})")
    for flag in ("tasks", "lengths", "depths", "methods", "budgets"):
        cli.distinct(f"--{flag}", getattr(args, flag))
    if LONG_ANSWER in args.tasks and len(args.tasks) > 1:
        raise BadInput(f"--tasks {LONG_ANSWER} runs alone: its rows are scored per cache limit, the others per budget")
    if LONG_ANSWER in args.tasks and args.evict_every >= min(args.budgets):
        raise BadInput(f"--evict-every must be below every --budgets (cache limits of --tasks {LONG_ANSWER}; "
                       f"got {args.evict_every} and {min(args.budgets)})")
    for flag in ("seeds", "limit", "agree_tokens", "recall_queries", "draft_len", "answer_tokens", "evict_every"):
        if getattr(args, flag) is not None:  # None: not given
            cli.at_least(cli.flag_name(flag), getattr(args, flag), 1)
    cli.positive("--prefill-chunk", args.prefill_chunk)
    notes = []
    cli.check_grid(args.methods, args.budgets, notes, window=args.window, window_laqpp=args.window_laqpp,
                   lookahead=args.lookahead, kernel=args.pool_kernel, pool=args.pool)
    if not args.data and set(args.methods) != {"full"}:
        cli.budgets_note(args.budgets, args.lengths, notes)
    return notes


def build_tasks(args, tok, context: int) -> list[Task]:
    """The generated tasks; a length too short for a task's fact and question is refused, since the
    prompt would be longer than asked."""
    new, flag = ((args.answer_tokens, "--answer-tokens") if args.tasks == [LONG_ANSWER]
                 else (args.agree_tokens, "--agree-tokens"))
    if max(args.lengths) + new > context:
        raise BadInput(f"--lengths up to {max(args.lengths)} + {flag} {new} exceed the model's context of {context}")
    tasks = [TASKS[t](tok, n, d, s) for t in args.tasks for n in args.lengths
             for d in ([0.5] if t == LONG_ANSWER else args.depths) for s in range(args.seeds)]
    for t in tasks:
        n = len(task_prompt_ids(tok, t))
        if n > t.length:
            raise BadInput(f"--lengths {t.length} is too short for {t.name}: its prompt takes {n} tokens")
    return tasks


def write_results(out: Path, args, rows, summary=None):
    """results.json, replaced whole after every task: an interrupted run keeps what finished."""
    result = {"args": vars(args), "rows": rows, "complete": summary is not None}
    if summary is not None:
        result["summary"] = {f"{m}@{b}": s for (m, b), s in summary.items()}
    cli.write_json(out / "results.json", result)


def save_figure(path: Path, draw, *args):
    cli.write_atomic(path, lambda tmp: draw(*args, tmp))


def main(args) -> dict:
    from tqdm import tqdm
    notes = check_args(args)
    budgets = sorted(args.budgets)
    tasks = load_longbench(args.data, args.limit) if args.data else None
    dev, dt = cli.check_device(args.device, args.dtype)
    resume = args.suite and not args.overwrite and (Path(args.out) / "results.jsonl").is_file()
    out = cli.check_out(args.out, args.overwrite or resume)
    model, tok = load(args.ckpt, dev, dt)
    args.loaded = model.source  # recorded in results.json: --ckpt llama may have fallen back to SmolLM2
    if args.agree_tokens >= model.args.max_seq_len // 2:
        raise BadInput(f"--agree-tokens {args.agree_tokens} leaves too little of the model's context of "
                       f"{model.args.max_seq_len} for the prompt")
    if args.suite:
        samples = suite_samples(model, tok, args)
    else:
        tasks = tasks or build_tasks(args, tok, model.args.max_seq_len)
    for line in notes:  # all input is checked: what lqc does with it
        cli.note("eval.py", line)
    if args.suite:
        return main_suite(model, tok, args, out, resume, samples)
    cli.start_out(out, OUTPUTS)
    rows, long_answer = [], tasks[0].name == LONG_ANSWER
    score = evaluate_long_answer if long_answer else evaluate_task
    cut = 0
    for task in tqdm(tasks, desc="eval", unit="prompt"):
        task_rows = score(model, tok, task, args.methods, budgets, args)
        cut += bool(task_rows and task_rows[0].get("cut_from"))
        rows += task_rows
        write_results(out, args, rows)
    if cut:
        cli.note("eval.py", f"{cut} of {len(tasks)} prompts were longer than the model's context of "
                            f"{model.args.max_seq_len} tokens (less the answer and --agree-tokens): their middle was cut "
                            "out, as LongBench does (results.json: prompt_tokens and cut_from per row)")
    caption = run_caption(args, len(tasks))
    if long_answer:
        summary = summarize(rows, LONG_METRICS)
        table = long_answer_table(summary, args.methods, budgets)
        draw = partial(plot_accuracy, metrics=("acc", "agree"),
                       xlabel="cache limit (entries per KV head per layer while decoding)")
        save_figure(out / "accuracy_vs_budget.png", draw, summary, args.methods, budgets, caption)
    else:
        summary = summarize(rows)
        table = markdown_table(summary, args.methods, budgets)
        save_figure(out / "accuracy_vs_budget.png", plot_accuracy, summary, args.methods, budgets, caption)
    if not args.data and not long_answer:
        save_figure(out / "heatmap.png", plot_heatmaps, rows, args.methods, budgets[0], caption)
    if args.plot_kept:
        save_figure(out / "kept.png", plot_kept, model, tok, tasks[0], args.methods, budgets[0], args)
    cli.write_text(out / "results.md", table + "\n")
    write_results(out, args, rows, summary)  # last: a complete results.json means everything is there
    cli.write_stdout(table + "\n")
    print(f"wrote {out}/results.json, results.md and figures", file=sys.stderr)
    return summary


SUITE_OUTPUTS = ["results.json", "results.md", "suite.png"]


def suite_samples(model, tok, args) -> list:
    """The suite's prompts, each checked to fit its length and the model's context."""
    if max(args.lengths) + 64 > model.args.max_seq_len:
        raise BadInput(f"--lengths up to {max(args.lengths)} (+ the answer) exceed the model's context of "
                       f"{model.args.max_seq_len}")
    samples = ruler.build(tok, args.tasks, args.lengths, args.depths, args.seeds)
    for s in samples:
        n = len(task_prompt_ids(tok, s))
        if n > s.length:
            raise BadInput(f"--lengths {s.length} is too short for {s.name}: its prompt takes {n} tokens")
    return samples


def main_suite(model, tok, args, out: Path, resume: bool, samples: list) -> dict:
    cli.start_out(out, SUITE_OUTPUTS + ([] if resume else ["results.jsonl"]))
    rows = run_suite(model, tok, args, out, samples)
    budgets = sorted(args.budgets)
    summary = suite_summary(rows)
    table = suite_tables(summary, args.methods, budgets, args.tasks)
    n_prompts = len({(r["task"], r["length"], r["depth"], r["seed"], r["haystack"]) for r in rows})
    complete = n_prompts == len(args.tasks) * len(args.lengths) * args.seeds
    caption = f"{args.ckpt}, {n_prompts} prompts"
    if rows:
        at = 128 if 128 in budgets else budgets[len(budgets) // 2]
        save_figure(out / "suite.png", plot_suite, summary, args.methods, budgets, caption, at)
    cli.write_text(out / "results.md", table + "\n")
    cli.write_json(out / "results.json", {"args": vars(args), "complete": complete, "rows": rows,
                                          "summary": {"|".join(map(str, k)): v for k, v in summary.items()}})
    cli.write_stdout(table + "\n")
    print(f"wrote {out}/results.jsonl, results.json, results.md and suite.png"
          + ("" if complete else " (not complete: rerun the same command to continue)"), file=sys.stderr)
    return summary


if __name__ == "__main__":
    cli.exit_on_bad_input("eval.py", main, parse_args())
