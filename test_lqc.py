"""lqc tests: no network, a few minutes on 2 CPU cores.

Most tests use a tiny random Llama (seeded); a few run the embedded SmolLM2 end to end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import generate as G
import lqc
import model as M

ROOT = Path(__file__).parent
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! 12345 67890. Sphinx of black quartz, judge my vow. ") * 3


# ----------------------------------------------------------------------------------------------
# Helpers: a tiny random Llama, and checkpoints written by the tests themselves

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


def forward_all(model, ids) -> torch.Tensor:
    """Logits `[1, L, V]` of one full forward over ids `[1, L]`."""
    return model(ids, torch.arange(ids.shape[1])[None], model.new_cache())


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
    state = {hf: ours[name].detach().contiguous() for hf, name in M.weight_name_map(a, "hf").items()}
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


def _permute_like_llama_cpp(w: np.ndarray, n: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def save_gguf(model: M.Transformer, path: Path, qtype="F32", tokenizer="gpt2", chat_template=None) -> Path:
    """Write model as a llama.cpp-style GGUF: Q/K rows permuted as its converter does."""
    import gguf
    a = model.args
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(a.max_seq_len); w.add_embedding_length(a.dim); w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.ffn_dim); w.add_head_count(a.n_heads); w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim); w.add_value_length(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps); w.add_rope_freq_base(a.rope_theta); w.add_vocab_size(a.vocab_size)
    if tokenizer == "gpt2":
        tj = json.loads(train_bpe_tokenizer().to_str())
        vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab] + [f"<pad{i}>" for i in range(a.vocab_size - len(vocab))]
        w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    else:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=train_spm())
        n = sp.get_piece_size()
        tokens = [sp.id_to_piece(i) for i in range(n)] + [f"<pad{i}>" for i in range(a.vocab_size - n)]
        types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
        w.add_tokenizer_model("llama"); w.add_token_list(tokens)
        w.add_token_scores([sp.get_score(i) for i in range(n)] + [-1e9] * (a.vocab_size - n))
        w.add_token_types(types + [5] * (a.vocab_size - n))
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    if chat_template:
        w.add_chat_template(chat_template)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    for src, name in M.weight_name_map(a, "gguf").items():
        t = dict(model.named_parameters())[name].detach().float().numpy()
        if src.endswith("attn_q.weight"):
            t = _permute_like_llama_cpp(t, a.n_heads)
        elif src.endswith("attn_k.weight"):
            t = _permute_like_llama_cpp(t, a.n_kv_heads)
        if t.ndim == 1 or qtype == "F32":
            w.add_tensor(src, t.astype(np.float32))
        else:
            w.add_tensor(src, gguf.quants.quantize(t, q), raw_dtype=q)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture(scope="module")
def smollm2():
    return M.load("smollm2")


# ----------------------------------------------------------------------------------------------
# The model

@FAST
@given(L=st.integers(1, 70), n_new=st.integers(1, 6), group=st.sampled_from([(4, 4), (4, 2), (6, 2), (4, 1)]),
       chunk=st.integers(1, 40))
def test_incremental_decode_equals_full_forward(L, n_new, group, chunk):
    model = tiny(*group)
    ids = torch.randint(0, model.args.vocab_size, (1, L + n_new), generator=torch.Generator().manual_seed(L))
    full = forward_all(model, ids)  # [1, L + n_new, V]
    pre = G.prefill(model, ids[:, :L], chunk=chunk)
    torch.testing.assert_close(pre.logits, full[:, L - 1], atol=1e-5, rtol=1e-5)
    for i in range(n_new):
        step = model(ids[:, L + i:L + i + 1], torch.tensor([[L + i]]), pre.cache)[:, -1]
        torch.testing.assert_close(step, full[:, L + i], atol=1e-5, rtol=1e-5)
    assert pre.cache.length == L + n_new


def test_cache_is_per_kv_head_and_queries_are_post_rope():
    model = tiny(6, 2)
    ids = torch.randint(0, 300, (1, 9))
    cache = model.new_cache()
    logits, qs = model(ids, torch.arange(9)[None], cache, return_queries=True)
    assert cache.k[0].shape == (1, 2, 9, 16) and cache.pos[0].shape == (1, 2, 9)
    assert len(qs) == 2 and qs[0].shape == (1, 6, 9, 16)
    # post-RoPE: the query at position 0 is un-rotated, later ones are rotated (norm preserved)
    x = model.layers[0].attention_norm(model.tok_embeddings(ids))
    raw = model.layers[0].attention.wq(x).view(1, 9, 6, 16).transpose(1, 2)
    torch.testing.assert_close(qs[0][:, :, 0], raw[:, :, 0])
    assert not torch.allclose(qs[0][:, :, 5], raw[:, :, 5])
    torch.testing.assert_close(qs[0].norm(dim=-1), raw.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_matches_reference_formula():
    args = M.ModelArgs(**M.PRESETS["llama-3.2-1b"])
    inv = M.rope_inv_freq(args)
    base = 1.0 / (args.rope_theta ** (torch.arange(0, 64, 2).double() / 64))
    wavelen = 2 * torch.pi / base
    assert torch.allclose(inv[wavelen < 8192 / 4], base[wavelen < 8192 / 4].float())  # high freq kept
    assert torch.allclose(inv[wavelen > 8192], (base[wavelen > 8192] / 32).float())  # low freq slowed
    assert inv.shape == (32,)


@pytest.mark.parametrize("shards,tokenizer", [(1, "json"), (3, "json"), (2, "spm")])
def test_hf_dir_round_trip(tmp_path, shards, tokenizer):
    model = tiny(4, 2, seed=3)
    path = save_hf_dir(model, tmp_path / "ckpt", shards, tokenizer)
    loaded, tok = M.load(str(path))
    ids = torch.tensor([tok.encode("How vexingly quick daft zebras jump!")])
    assert ids.shape[1] > 3
    torch.testing.assert_close(forward_all(loaded, ids), forward_all(model, ids), atol=0, rtol=0)
    assert tok.decode(ids[0].tolist()).strip() == "How vexingly quick daft zebras jump!"


def test_strict_loading_names_the_offending_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save_hf_dir(tiny(), tmp_path / "ckpt")
    state = load_file(str(path / "model.safetensors"))
    bad = dict(state, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(M.CheckpointError, match="model.layers.0.mlp.extra.weight"):
        M.load(str(path))
    del bad["model.layers.0.mlp.extra.weight"], bad["model.layers.1.self_attn.k_proj.weight"]
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(M.CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
        M.load(str(path))
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(5, 64)
    save_file(bad, str(path / "model.safetensors"))
    with pytest.raises(M.CheckpointError, match=r"k_proj.weight has shape \(5, 64\)"):
        M.load(str(path))


def test_unsupported_architecture_is_refused():
    with pytest.raises(M.CheckpointError, match="model_type='gpt2'"):
        M.ModelArgs.from_hf_config({"model_type": "gpt2"})
    cfg = json.loads(json.dumps(dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=320, sliding_window=4096,
                                     max_position_embeddings=32768)))
    with pytest.raises(M.CheckpointError, match="sliding_window"):
        M.ModelArgs.from_hf_config(cfg)
    with pytest.raises(M.CheckpointError, match="yarn"):
        M.ModelArgs.from_hf_config(dict(cfg, sliding_window=None, rope_scaling={"rope_type": "yarn", "factor": 4}))


@pytest.mark.parametrize("qtype,atol", [("F32", 0.0), ("F16", 2e-2), ("Q8_0", 5e-2), ("Q4_0", 0.5)])
def test_gguf_round_trip_undoes_qk_permutation(tmp_path, qtype, atol):
    model = tiny(4, 2, seed=5, dim=64)
    path = save_gguf(model, tmp_path / "m.gguf", qtype)
    loaded, tok = M.load(str(path))
    ids = torch.tensor([tok.encode("Pack my box with five dozen liquor jugs.")])
    want, got = forward_all(model, ids), forward_all(loaded, ids)
    assert (got - want).abs().max().item() <= atol
    if qtype == "F32":  # the permutation matters: without undoing it the logits are far off
        w = loaded.layers[0].attention.wq.weight
        assert torch.equal(w, model.layers[0].attention.wq.weight)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gguf_tokenizer_matches_the_original(tmp_path, kind):
    model = tiny()
    loaded, tok = M.load(str(save_gguf(model, tmp_path / "m.gguf", tokenizer=kind)))
    if kind == "gpt2":
        ref = train_bpe_tokenizer()
        encode = lambda s: ref.encode(s).ids
    else:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=train_spm())
        encode = sp.encode
    for s in ["The quick brown fox", "  judge my vow 12345!", "zebras, jugs\nand quartz", "ünïcödé ok"]:
        assert tok.encode(s) == encode(s), s
        assert tok.decode(tok.encode(s)) == s


def test_hub_id_loads_from_local_cache_and_fails_clearly_offline(tmp_path, monkeypatch):
    # a hub cache laid out as huggingface_hub writes it, holding a checkpoint this test wrote
    repo = tmp_path / "hub" / "models--lqc-test--tiny-llama"
    snap = repo / "snapshots" / ("a" * 40)
    save_hf_dir(tiny(seed=7), snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    model, tok = M.load("lqc-test/tiny-llama")
    ids = torch.tensor([tok.encode("quick zebras")])
    torch.testing.assert_close(forward_all(model, ids), forward_all(tiny(seed=7), ids), atol=0, rtol=0)
    with pytest.raises(M.CheckpointError, match="lqc-test/absent.*not in the local HF cache"):
        M.load("lqc-test/absent")


def test_llama_alias_falls_back_to_embedded_smollm2(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    path = M.resolve_checkpoint("llama")
    assert path == M.resolve_checkpoint("smollm2") and path.suffix == ".gguf"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta-llama/Llama-3.2-1B-Instruct" in err[0] and "smollm2" in err[0]


def test_chat_formats():
    assert M.detect_chat_format("{{'<|im_start|>system\\nBe brief<|im_end|>'}}") == ("chatml", "Be brief")
    assert M.detect_chat_format("<|start_header_id|>") == ("llama3", None)
    assert M.format_chat("llama2", "hi", None) == "<s>[INST] hi [/INST]"
    assert M.format_chat("llama3", "hi", None).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_smollm2_tokenizer_and_chat(smollm2):
    _, tok = smollm2
    assert tok.chat_format == "chatml" and "SmolLM" in tok.system_prompt
    assert len(tok.encode("12345")) == 5  # SmolLM splits digits
    ids = tok.prompt_ids("Hi", chat=True)
    assert ids[0] == tok.bos_id == 1 and tok.decode(ids).endswith("assistant\n")
    assert 2 in tok.eos_ids


def test_smollm2_answers_a_factual_question(smollm2):
    model, tok = smollm2
    ids = tok.prompt_ids("What is the capital of France? Answer in one word.", chat=True)
    out, _ = G.run(model, ids, lqc.EvictConfig("full"), max_new_tokens=8, eos_ids=tok.eos_ids)
    assert "Paris" in tok.decode(out)


# ----------------------------------------------------------------------------------------------
# The command line: bad input gets one line and exit code 2

def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return str(save_hf_dir(tiny(), tmp_path_factory.mktemp("cli") / "tiny"))


def test_cli_generates_with_eviction(tiny_ckpt, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(TEXT)
    r = run_cli("--ckpt", tiny_ckpt, "--prompt-file", str(prompt), "--method", "laqpp", "--budget", "40",
                "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert "KV kept 40/" in summary and "evict" in summary and "decode" in summary


BAD = [
    (["--ckpt", "/nonexistent/model.gguf"], "not found"),
    (["--ckpt", "nosuchalias"], "not found"),
    (["--budget", "0"], "budget must be > 0"),
    (["--method", "magic"], "invalid choice"),
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "zebra " * 1100], "exceeds the model's context"),
    (["--dtype", "float8"], "invalid choice"),
    (["--device", "cuda"], "not available"),
    (["--device", "toaster"], "unknown device"),
    (["--max-new-tokens", "x"], "invalid int"),
    (["--prompt-file", "/nonexistent.txt"], "cannot read --prompt-file"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_cli_bad_input(tiny_ckpt, args, message):
    if "--ckpt" not in args:
        args = ["--ckpt", tiny_ckpt, *args]
    if "--prompt" not in args and "--prompt-file" not in args:
        args = [*args, "--prompt", "quick zebras"]
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("CUDA is available here")
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    r = run_cli("--ckpt", str(bad), "--prompt", "hi")
    assert r.returncode == 2 and "cannot read GGUF" in r.stderr and "Traceback" not in r.stderr
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    r = run_cli("--ckpt", str(d), "--prompt", "hi")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
