"""lqc's Python API on its own model: load a checkpoint, prefill + evict + decode a document and
its question with one method and budget, print the answer.

    pip install -e .   (or make install), then:
    python examples/api.py                                   # SmolLM2-135M-Instruct, LAQ++ keeping 64
    python examples/api.py --method snapkv --budget 128
    python examples/api.py --ckpt path/to/hf_dir --device cuda --dtype bfloat16

The same steps by hand: decoding.prefill -> decoding.evict (lqc.plan_eviction) -> decoding.decode.
"""
from pathlib import Path

import lqc
from lqc_modules import checkpoint, cli, decoding  # lqc's files, under private names

DOC = Path(__file__).parent / "doc.txt"  # a document whose last line is a question


def answer(ckpt: str, method: str, budget: int, max_new_tokens: int, device: str, dtype: str) -> str:
    cfg = cli.evict_config(method=method, budget=budget)  # window, lookahead, pooling: keyword fields
    cli.positive("--max-new-tokens", max_new_tokens)
    dev, dt = cli.check_device(device, dtype)  # a bad flag is one line, before any model work
    model, tok = checkpoint.load(ckpt, dev, dt)
    ids = tok.prompt_ids(DOC.read_text().strip(), chat=tok.chat_format is not None)
    out, stats = decoding.run(model, ids, cfg, max_new_tokens=max_new_tokens, eos_ids=tok.eos_ids)
    print(f"[{method}] {stats.line()}")
    return tok.decode(out)


if __name__ == "__main__":
    # cli's parser and exit wrapper: bad input is one line and exit 2, as in generate.py
    p = cli.ArgParser(description="Answer examples/doc.txt's question with KV-cache eviction.")
    p.add_argument("--ckpt", default="smollm2", help="short name, .gguf file, HF directory or hub id")
    p.add_argument("--method", default="laqpp", choices=lqc.method_names())
    p.add_argument("--budget", type=int, default=64, help="kept prompt entries per KV head per layer")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    print(cli.exit_on_bad_input("api.py", answer, **vars(p.parse_args())))
