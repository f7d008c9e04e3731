"""Tiny random checkpoints that the tests and tools write themselves (no network): a seeded random
Llama, saved as an HF directory with a BPE or SentencePiece tokenizer trained here, and the same
shapes as a transformers model. check_cuda.py and the tests share them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import checkpoint as C
import model as M

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! 12345 67890. Sphinx of black quartz, judge my vow. ") * 3


def tiny(n_heads=4, n_kv_heads=2, n_layers=2, seed=0, **kw) -> M.Transformer:
    torch.manual_seed(seed)
    args = M.ModelArgs(**{**M.PRESETS["tiny"], "n_heads": n_heads, "n_kv_heads": n_kv_heads, "n_layers": n_layers,
                          "head_dim": 16, **kw})
    model = M.Transformer(args).eval()
    with torch.no_grad():  # random norms too, so a wrong weight mapping cannot hide behind ones
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def train_bpe_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    return tok


def save_hf_dir(model: M.Transformer, path: Path, shards: int = 1, tokenizer: str = "json") -> Path:
    """Write model as an HF Llama checkpoint: config.json, safetensors (sharded or not), a tokenizer."""
    from safetensors.torch import save_file
    a = model.args
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=a.dim, num_hidden_layers=a.n_layers,
               num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_dim,
               intermediate_size=a.ffn_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
               max_position_embeddings=a.max_seq_len, tie_word_embeddings=a.tie_embeddings, hidden_act="silu",
               bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(cfg))
    ours = dict(model.named_parameters())
    state = {hf: ours[name].detach().contiguous() for hf, name in C.weight_name_map(a, "hf").items()}
    names = sorted(state)
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: state[n] for n in part}, str(path / fname))
            weight_map.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer == "json":
        train_bpe_tokenizer().save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    else:
        (path / "tokenizer.model").write_bytes(train_spm())
    return path


def train_spm(vocab_size=316) -> bytes:
    import io
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(". ") * 20), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama's
    return buf.getvalue()


def rand_ids(model, L, seed=0):
    return torch.randint(0, model.args.vocab_size, (1, L), generator=torch.Generator().manual_seed(seed))


def hf_tiny(tmp_path, n_heads=4, n_kv_heads=2, seed=0):
    """A tiny random transformers Llama, saved as safetensors, and lqc's model loaded from it."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=n_heads,
                                   num_key_value_heads=n_kv_heads, head_dim=16, vocab_size=320, max_position_embeddings=1024,
                                   rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    hf = transformers.LlamaForCausalLM(cfg).eval().float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.generation_config.eos_token_id = 2
    path = tmp_path / "hf-tiny"
    hf.save_pretrained(path, safe_serialization=True)
    train_bpe_tokenizer().save(str(path / "tokenizer.json"))
    ours, _ = C.load(str(path))
    return hf, ours
