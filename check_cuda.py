"""Check lqc's CUDA paths on a tiny random Llama, the day a GPU is at hand.

    make install TORCH=torch==2.13.0+cu126 TORCH_INDEX=https://download.pytorch.org/whl/cu126
    .venv/bin/python check_cuda.py                # one line per check; exit 0: all passed, 1: one failed
    .venv/bin/python check_cuda.py --checks dense flex    # some of them; --device cpu runs them on the CPU

Each check runs on the device and compares with the readable path on the CPU in fp32, same weights
(the tests' tiny random models):
  dense    prefill -> eviction -> decode, every method: same kept positions, same greedy tokens
  flex     the fast path's static cache over FlexAttention (eager): same greedy tokens
  compile  the decode step under torch.compile (CUDA graphs on CUDA): same tokens; compile time
  bf16     the same run in bfloat16: finite logits; greedy tokens that agree with fp32 are reported
  lqc_hf   a transformers Llama loaded with device_map="auto": lqc_hf.compress + greedy give lqc's tokens
Without a GPU it says so in one line and exits 2.

For speed on a GPU without downloading a model (decode and prefill time do not depend on the weights;
it writes on the GPU when there is one, else on the CPU):

    .venv/bin/python check_cuda.py --random-ckpt /tmp/r1b     # Llama-3.2-1B's shapes, random bf16 weights
    .venv/bin/python bench.py --ckpt /tmp/r1b --device cuda --dtype bfloat16 --lengths 8192 32768 --budgets 1024
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import decoding as D
import lqc
import model as M
from checkpoint import load
from steps import FastPath, make_step
from tiny_models import hf_tiny, rand_ids, save_hf_dir

NEW_TOKENS = 12
METHODS = list(lqc.METHODS)


@dataclass
class Env:
    path: Path  # a tiny random Llama as an HF directory (transformers and lqc read the same weights)
    device: torch.device
    ref: object  # lqc's model on the CPU in fp32: the reference
    model: object  # the same weights on the device, fp32
    ids: list[int]  # a random prompt


def small_cfg(method: str) -> lqc.EvictConfig:
    return lqc.EvictConfig(method=method, budget=24, window=8, window_laqpp=4, lookahead=3)


def tokens(model, ids: list[int], cfg: lqc.EvictConfig, **run_kw) -> list[int]:
    return D.run(model, ids, cfg, max_new_tokens=NEW_TOKENS, eos_ids=(), **run_kw)[0]


def kept(model, ids: list[int], cfg: lqc.EvictConfig) -> list[torch.Tensor]:
    """The kept indices per layer, on the CPU."""
    x = torch.tensor([ids], device=model.tok_embeddings.weight.device)
    pre = D.prefill(model, x, keep_queries=cfg.obs_window, h2o=cfg.needs_mass)
    return [i.cpu() for i in D.evict(cfg, model, pre)[1]]


def check_dense(env: Env):
    bad = [m for m in METHODS
           if tokens(env.model, env.ids, small_cfg(m)) != tokens(env.ref, env.ids, small_cfg(m))
           or any(not torch.equal(a, b) for a, b in zip(kept(env.model, env.ids, small_cfg(m)),
                                                        kept(env.ref, env.ids, small_cfg(m))))]
    return not bad, f"{len(METHODS)} methods" + (f", differ: {' '.join(bad)}" if bad else "")


@torch.no_grad()
def check_flex(env: Env):
    """The fast path with FlexAttention block masks but an eager step: FlexAttention without compile."""
    cfg = small_cfg("adakv")  # ragged heads: the per-head lengths the BlockMask must honour
    fp = FastPath(make_step(env.model, compile=False), NEW_TOKENS, flex=True)
    pre = D.prefill(env.model, torch.tensor([env.ids], device=env.device), keep_queries=cfg.obs_window)
    cache = fp.pack(env.model, D.evict(cfg, env.model, pre, fast=fp)[0])
    got = D.decode(env.model, cache, pre.obs.logits, pre.obs.next_pos, max_new_tokens=NEW_TOKENS, step=fp)[0]
    return got == tokens(env.ref, env.ids, cfg), "adakv over StaticKVCache(flex=True)"


def check_compile(env: Env):
    cfg = small_cfg("laqpp")
    t = time.perf_counter()
    got = tokens(env.model, env.ids, cfg, compile=True)
    return got == tokens(env.ref, env.ids, cfg), f"laqpp, first run (compile included) {time.perf_counter() - t:.1f} s"


def check_bf16(env: Env):
    cfg = small_cfg("laqpp")
    model, _ = load(str(env.path), env.device, torch.bfloat16)
    finite = bool(D.prefill(model, torch.tensor([env.ids], device=env.device)).obs.logits.isfinite().all())
    got, want = tokens(model, env.ids, cfg), tokens(env.ref, env.ids, cfg)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    return finite and len(got) == NEW_TOKENS, f"laqpp, finite logits; first {same}/{NEW_TOKENS} tokens as fp32's"


def check_lqc_hf(env: Env):
    """lqc_hf on a transformers model placed by accelerate (device_map="auto": all on one GPU, or
    split over several) against lqc's own model on the CPU."""
    import lqc_hf
    from transformers import AutoModelForCausalLM
    device_map = "auto" if env.device.type == "cuda" else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(env.path, dtype=torch.float32, device_map=device_map)
    cfg = small_cfg("laqpp")
    want = D.run(env.ref, env.ids, cfg, max_new_tokens=NEW_TOKENS, eos_ids=(2,))[0]  # the model's EOS, as greedy's
    x = torch.tensor([env.ids], device=hf.device)
    cache, logits, _ = lqc_hf.compress(hf, x, "laqpp", cfg.budget, window=8, window_laqpp=4, lookahead=3)
    got = lqc_hf.greedy(hf, cache, logits, len(env.ids), NEW_TOKENS)
    devices = sorted({str(p.device) for p in hf.parameters()})
    return got == want, f"laqpp, device_map={device_map!r} -> {' '.join(devices)}"


CHECKS = {"dense": check_dense, "flex": check_flex, "compile": check_compile, "bf16": check_bf16,
          "lqc_hf": check_lqc_hf}


def run_check(name: str, env: Env) -> bool:
    """One line per check; an exception is a failure with its first line."""
    try:
        ok, detail = CHECKS[name](env)
    except Exception as e:  # a check that breaks is reported, the others still run
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        ok, detail = False, f"{type(e).__name__}: {first}"[:200]
    print(f"{'ok  ' if ok else 'FAIL'} {name:8} {detail}", flush=True)
    return ok


def quiet():
    """Progress bars and the eager-FlexAttention warning would bury the one line per check."""
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    try:
        from transformers.utils import logging
        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


LLAMA_1B = replace(M.ModelArgs.from_name("llama-3.2-1b"), rope_scaling=None)  # its RoPE scaling does not change the work


@torch.no_grad()
def write_random_ckpt(path: Path, device: str) -> int:
    """A Llama of LLAMA_1B's shapes with random bf16 weights and a tiny tokenizer, as an HF directory that
    lqc and transformers both load: for speed runs only (its text is noise)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        print(f"check_cuda.py: --random-ckpt {path} exists and is not an empty folder; give a new one", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Transformer(LLAMA_1B).to(torch.bfloat16)
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
            else:  # norm weights
                p.fill_(1.0)
    try:
        save_hf_dir(model, path)
    except OSError as e:
        print(f"check_cuda.py: cannot write --random-ckpt {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, random", flush=True)
    return 0


def main(device: str, checks: list[str], random_ckpt: Path | None = None) -> int:
    if random_ckpt is not None:
        return write_random_ckpt(random_ckpt, device if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"check_cuda.py: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
              "nothing checked", file=sys.stderr)
        return 2
    quiet()
    torch.set_float32_matmul_precision("highest")  # no TF32: fp32 on the GPU is compared with fp32 on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        hf_tiny(Path(tmp))
        path = Path(tmp) / "hf-tiny"
        ref = load(str(path))[0]
        env = Env(path, dev, ref, load(str(path), dev)[0], rand_ids(ref, 70, 3)[0].tolist())
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}",
              flush=True)
        results = [run_check(c, env) for c in checks]
    return 0 if all(results) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Check lqc's CUDA paths on a tiny random Llama.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    p.add_argument("--random-ckpt", type=Path, default=None,
                   help="write a random Llama-3.2-1B-shaped HF checkpoint there for bench.py, and stop")
    sys.exit(main(**vars(p.parse_args())))
