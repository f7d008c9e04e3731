"""LAQ on a Hugging Face transformers model (lqc_hf), next to kvpress's pipeline.

    pip install -e ".[hf]"   (or make install), then:
    python examples/kvpress_example.py                    # SmolLM2-135M-Instruct, the GGUF lqc ships with
    python examples/kvpress_example.py --model meta-llama/Llama-3.2-1B-Instruct --device-map auto

1. lqc_hf.compress: the whole chat prompt, question and assistant header included, is prefilled;
   LAQ's pseudo tokens then start the answer, and their queries pick the keys to keep.
2. kvpress's pipeline prefills and compresses the context alone, *before* the question and the
   assistant header are fed: by design, one compressed context serves many questions. LQCPress
   runs there too, but the eviction cannot know the question: LAQ's pseudo tokens continue the
   user's message instead of answering it, and SnapKV's window sees the end of the document.
   Measured with the defaults (SmolLM2-135M-Instruct, fp32, budget 64 of a 530-token prompt):
       compress full / laqpp          Agnes Morrow (right)
       compress snapkv                "maintained by the town of Ravensburg, Germany"
       pipeline, no press             Agnes Morrow (right)
       pipeline, SnapKVPress (64)     describes the Lantern Regatta (the end of the document)
       pipeline, LQCPress laqpp (64)  "The town of Wrenmouth, which is a small village in the north of England, ..."
   So when the question is known before eviction, prefill it: compress() (path 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers.utils import logging
except ImportError as e:
    print(f"kvpress_example.py: skipped, {e.name} is not installed (pip install -e '.[hf]')")
    sys.exit(0)

from lqc_hf import LQCPress, compress, greedy
from lqc_modules import checkpoint

DOC = (Path(__file__).parent / "doc.txt").read_text()
CONTEXT, QUESTION = DOC.strip().rsplit("\n\nQuestion: ", 1)  # doc.txt ends with its question


def load(model_id: str | None, device_map: str | None, dtype: torch.dtype):
    """A transformers model and tokenizer: a hub id, or by default lqc's embedded SmolLM2 GGUF."""
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if model_id:
        kw = dict(pretrained_model_name_or_path=model_id)
    else:
        gguf = checkpoint.resolve_checkpoint("smollm2")
        kw = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(**kw, dtype=dtype, device_map=device_map).eval()
    return model, AutoTokenizer.from_pretrained(**kw)


def chat_ids(tok, text: str, device) -> torch.Tensor:
    """The user message in the model's chat template, with the assistant header: `[1, L]`."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return ids.to(device)


def answer_with_compress(model, tok, method: str, budget: int, max_new_tokens: int) -> str:
    """Path 1: prefill the whole prompt (question included), evict with `method`, decode greedily."""
    ids = chat_ids(tok, f"{CONTEXT}\n\nQuestion: {QUESTION}", model.device)
    cache, logits, _ = compress(model, ids, method, budget=budget)
    return tok.decode(greedy(model, cache, logits, ids.shape[1], max_new_tokens), skip_special_tokens=True)


def answers_with_pipeline(model, tok, budget: int, max_new_tokens: int) -> dict[str, str]:
    """Path 2: kvpress's pipeline, the context compressed before the question is seen."""
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    n = pipe.preprocess(CONTEXT, [QUESTION], answer_prefix="", max_context_length=10**6)["context_ids"].shape[1]
    presses = {"no press": None,
               f"SnapKVPress (keeps {budget})": kvpress.SnapKVPress(compression_ratio=1 - budget / n),
               f'LQCPress("laqpp", budget={budget})': LQCPress("laqpp", budget=budget)}
    question = f"\n\nQuestion: {QUESTION}"  # the same user message as path 1, split where kvpress splits it
    return {name: pipe(CONTEXT, question=question, press=press, max_new_tokens=max_new_tokens)["answer"]
            for name, press in presses.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="hub id or local HF directory (default: lqc's embedded SmolLM2 GGUF)")
    p.add_argument("--device-map", default=None, help='e.g. "auto" to spread a large model over the GPUs')
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--budget", type=int, default=64, help="kept entries per KV head per layer")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-pipeline", action="store_true", help="only path 1 (compress)")
    args = p.parse_args()
    model, tok = load(args.model, args.device_map, getattr(torch, args.dtype))
    print(f"Q: {QUESTION}")
    for method in ("full", "snapkv", "laqpp"):
        print(f"compress {method:>6}: {answer_with_compress(model, tok, method, args.budget, args.max_new_tokens)!r}")
    if not args.no_pipeline:
        for name, answer in answers_with_pipeline(model, tok, args.budget, args.max_new_tokens).items():
            print(f"pipeline, {name}: {answer!r}")


if __name__ == "__main__":
    main()
