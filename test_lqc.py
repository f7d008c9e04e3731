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
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

import checkpoint as C
import decoding as D
import lqc
import model as M
import tiny_models
import tokenizer as T
from sampling import Sampling, probs, sample
from steps import FastPath, make_step, model_step, query_step, to_static
from tiny_models import TEXT, rand_ids, save_hf_dir, tiny, train_bpe_tokenizer, train_spm  # re-exported to the other tests

ROOT = Path(__file__).parent


def examples(n: int) -> int:
    """n examples per property under `make test`; the fuzz profile's count under `make fuzz`
    (an explicit max_examples would otherwise override the profile's)."""
    return settings.default.max_examples if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else n


FAST = settings(max_examples=examples(12), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# ----------------------------------------------------------------------------------------------
# Helpers: a tiny random Llama, and checkpoints written by the tests themselves

def forward_all(model, ids) -> torch.Tensor:
    """Logits `[1, L, V]` of one full forward over ids `[1, L]`."""
    return model(ids, torch.arange(ids.shape[1])[None], model.new_cache())


def _permute_like_llama_cpp(w: np.ndarray, n: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def save_gguf(model: M.Transformer, path: Path, qtype="F32", tokenizer="gpt2", chat_template=None,
              rope_freqs=None) -> Path:
    """Write model as a llama.cpp-style GGUF: Q/K rows permuted as its converter does."""
    import gguf
    a = model.args
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(a.max_seq_len); w.add_embedding_length(a.dim); w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.ffn_dim); w.add_head_count(a.n_heads); w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim); w.add_value_length(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps); w.add_rope_freq_base(a.rope_theta); w.add_vocab_size(a.vocab_size)
    add_gguf_tokenizer(w, a.vocab_size, tokenizer, chat_template=chat_template)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    if rope_freqs is not None:  # Llama 3.x GGUFs carry their rope scaling as per-dimension factors
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    for src, name in C.weight_name_map(a, "gguf").items():
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


def add_gguf_tokenizer(w, vocab_size: int, kind="gpt2", pre="default", chat_template=None, extra=()) -> None:
    """The test tokenizers as a GGUF vocabulary, padded to vocab_size; `extra` control tokens
    (e.g. a chat format's) replace the last paddings."""
    if kind == "gpt2":
        tj = json.loads(train_bpe_tokenizer().to_str())
        vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab] + [f"<pad{i}>" for i in range(vocab_size - len(vocab))]
        types = [3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens]
        w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre(pre)
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    else:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_proto=train_spm())
        n = sp.get_piece_size()
        tokens = [sp.id_to_piece(i) for i in range(n)] + [f"<pad{i}>" for i in range(vocab_size - n)]
        types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
        types += [5] * (vocab_size - n)
        w.add_tokenizer_model("llama")
        w.add_token_scores([sp.get_score(i) for i in range(n)] + [-1e9] * (vocab_size - n))
    if extra:
        tokens[-len(extra):], types[-len(extra):] = list(extra), [3] * len(extra)
    w.add_token_list(tokens); w.add_token_types(types)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    if chat_template:
        w.add_chat_template(chat_template)


@pytest.fixture(scope="module")
def smollm2():
    return C.load("smollm2")


# ----------------------------------------------------------------------------------------------
# The model

@FAST
@given(L=st.integers(1, 70), n_new=st.integers(1, 6), group=st.sampled_from([(4, 4), (4, 2), (6, 2), (4, 1)]),
       chunk=st.integers(1, 40))
def test_incremental_decode_equals_full_forward(L, n_new, group, chunk):
    model = tiny(*group)
    ids = torch.randint(0, model.args.vocab_size, (1, L + n_new), generator=torch.Generator().manual_seed(L))
    full = forward_all(model, ids)  # [1, L + n_new, V]
    pre = D.prefill(model, ids[:, :L], chunk=chunk)
    torch.testing.assert_close(pre.obs.logits, full[:, L - 1], atol=1e-5, rtol=1e-5)
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


def test_linear_rope_scaling_rotates_position_factor_p_as_p():
    """Linear scaling (position interpolation), as config.json and GGUF write it: position 4p
    rotates as p does without scaling."""
    plain = M.ModelArgs(**{**M.PRESETS["tiny"], "head_dim": 16})
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=320, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 4.0})
    scaled = C.args_from_hf_config(config)
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    pos = torch.arange(0, 4000, 4)[None]
    for a, b in zip(M.rope_cos_sin(M.rope_inv_freq(scaled), pos, torch.float32),
                    M.rope_cos_sin(M.rope_inv_freq(plain), pos // 4, torch.float32)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(M.rope_inv_freq(scaled), M.rope_inv_freq(plain))


def test_top_k_and_top_p_draw_only_from_what_they_keep():
    logits = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).log()
    cases = [(dict(top_k=2), [0.5, 0.2]),
             (dict(top_p=0.8), [0.5, 0.2, 0.15]),  # 0.5 + 0.2 < 0.8: the third is needed to reach it
             (dict(top_p=0.45), [0.5]),  # the first alone reaches it
             (dict(top_k=3, top_p=0.6), [0.5, 0.2])]  # top-p over top-k's renormalized 0.59, 0.24, 0.18
    gen = torch.Generator().manual_seed(0)
    for kw, kept in cases:
        s = Sampling(temperature=1.0, **kw)
        want = torch.zeros(5)
        want[:len(kept)] = torch.tensor(kept) / sum(kept)
        torch.testing.assert_close(probs(logits, s)[0], want)
        drawn = {int(sample(logits, s, gen)) for _ in range(200)}
        assert drawn == set(range(len(kept))), kw  # every kept token comes up, no other
    assert probs(logits * 2, Sampling(temperature=2.0)).allclose(probs(logits, Sampling(temperature=1.0)))


def test_static_cache_overflow_is_a_clear_error():
    model = tiny(4, 2)
    static = to_static(model, D.prefill(model, rand_ids(model, 10)).cache, extra=2, flex=False)
    with torch.no_grad():
        model(torch.tensor([[1, 2]]), torch.tensor([[10, 11]]), static)  # fills the room
        with pytest.raises(ValueError, match="the static cache is full: 12 of 12 slots"):
            model(torch.tensor([[3]]), torch.tensor([[12]]), static)


@pytest.mark.parametrize("shards,tokenizer", [(1, "json"), (3, "json"), (2, "spm")])
def test_hf_dir_round_trip(tmp_path, shards, tokenizer):
    model = tiny(4, 2, seed=3)
    path = save_hf_dir(model, tmp_path / "ckpt", shards, tokenizer)
    loaded, tok = C.load(str(path))
    ids = torch.tensor([tok.encode("How vexingly quick daft zebras jump!")])
    assert ids.shape[1] > 3
    torch.testing.assert_close(forward_all(loaded, ids), forward_all(model, ids), atol=0, rtol=0)
    assert tok.decode(ids[0].tolist()).strip() == "How vexingly quick daft zebras jump!"


@pytest.mark.parametrize("qtype,atol", [("F32", 0.0), ("F16", 2e-2), ("Q8_0", 5e-2), ("Q4_0", 0.5)])
def test_gguf_round_trip_undoes_qk_permutation(tmp_path, qtype, atol):
    model = tiny(4, 2, seed=5, dim=64)
    path = save_gguf(model, tmp_path / "m.gguf", qtype)
    loaded, tok = C.load(str(path))
    ids = torch.tensor([tok.encode("Pack my box with five dozen liquor jugs.")])
    want, got = forward_all(model, ids), forward_all(loaded, ids)
    assert (got - want).abs().max().item() <= atol
    if qtype == "F32":  # the permutation matters: without undoing it the logits are far off
        w = loaded.layers[0].attention.wq.weight
        assert torch.equal(w, model.layers[0].attention.wq.weight)


def test_gguf_rope_freqs_factors_reproduce_llama3_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = tiny(4, 2, seed=2, rope_scaling=scaling)
    plain = M.rope_inv_freq(M.ModelArgs(**{**M.PRESETS["tiny"], "head_dim": 16}))
    factors = plain / model.inv_freq  # what llama.cpp's converter writes
    assert (factors > 1.5).any()  # the scaling does something at these lengths
    loaded, tok = C.load(str(save_gguf(model, tmp_path / "m.gguf", rope_freqs=factors)))
    ids = rand_ids(model, 200, 4)
    torch.testing.assert_close(forward_all(loaded, ids), forward_all(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gguf_tokenizer_matches_the_original(tmp_path, kind):
    model = tiny()
    loaded, tok = C.load(str(save_gguf(model, tmp_path / "m.gguf", tokenizer=kind)))
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
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, tok = C.load("lqc-test/tiny-llama")
    ids = torch.tensor([tok.encode("quick zebras")])
    torch.testing.assert_close(forward_all(model, ids), forward_all(tiny(seed=7), ids), atol=0, rtol=0)
    with pytest.raises(M.CheckpointError, match="lqc-test/absent.*not in the local HF cache"):
        C.load("lqc-test/absent")


def test_llama_alias_falls_back_to_embedded_smollm2(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    path = C.resolve_checkpoint("llama")
    assert path == C.resolve_checkpoint("smollm2") and path.suffix == ".gguf"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta-llama/Llama-3.2-1B-Instruct" in err[0] and "smollm2" in err[0]


def test_chat_formats():
    assert T.detect_chat_format("{{'<|im_start|>system\\nBe brief<|im_end|>'}}") == ("chatml", "Be brief")
    assert T.detect_chat_format("<|start_header_id|>") == ("llama3", None)
    assert T.format_chat("llama2", "hi", None) == "<s>[INST] hi [/INST]"
    assert T.format_chat("llama3", "hi", None).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


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
    out, _ = D.run(model, ids, lqc.EvictConfig(method="full"), max_new_tokens=8, eos_ids=tok.eos_ids)
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


# ----------------------------------------------------------------------------------------------
# lqc.py: eviction policies

EVICTING = list(lqc.METHODS)  # every evicting method ("full" has no entry)
GROUPS = st.sampled_from([(4, 4), (4, 2), (6, 2), (4, 1), (8, 2)])  # GQA groups 1..4


def evict_and_decode(model, ids, cfg, steps=4, eos_ids=()):
    """Prefill, evict with cfg, greedy-decode `steps` tokens. Returns (per-step logits, tokens,
    prefill state, compacted cache, kept indices or None)."""
    L = ids.shape[1]
    pre = D.prefill(model, ids, chunk=16, keep_queries=cfg.obs_window, h2o=cfg.needs_mass)
    full_k = [k.clone() for k in pre.cache.k]
    cache, indices = D.evict(cfg, model, pre, eos_ids=eos_ids)
    assert all(torch.equal(a, b) for a, b in zip(full_k, pre.cache.k)), "eviction modified the full cache"
    logits, out = pre.obs.logits, []
    steps_logits = [logits]
    for i in range(steps):
        tok = logits.argmax(-1)
        out.append(tok.item())
        logits = model(tok[:, None], torch.tensor([[L + i]]), cache)[:, -1]
        steps_logits.append(logits)
    return steps_logits, out, pre, cache, indices


def small_cfg(method, budget, **kw):
    return lqc.EvictConfig(method=method, budget=budget, **{"window": 8, "window_laqpp": 4, "lookahead": 3, **kw})


@FAST
@given(L=st.integers(3, 60), extra=st.integers(0, 20), group=GROUPS, method=st.sampled_from(EVICTING))
def test_budget_covering_the_prompt_gives_the_full_cache(L, extra, group, method):
    model = tiny(*group)
    ids = rand_ids(model, L, L)
    full, full_tok, *_ = evict_and_decode(model, ids, small_cfg("full", 1))
    got, tok, _, cache, indices = evict_and_decode(model, ids, small_cfg(method, L + extra))
    assert indices is None and tok == full_tok
    for a, b in zip(got, full):
        assert torch.equal(a, b)


@FAST
@given(L=st.integers(20, 90), budget=st.integers(1, 40), group=GROUPS, method=st.sampled_from(EVICTING),
       seed=st.integers(0, 3))
def test_kept_indices_are_sorted_unique_and_keep_window_and_sinks(L, budget, group, method, seed):
    model = tiny(*group, n_layers=3)
    cfg = small_cfg(method, budget)
    ids = rand_ids(model, L, seed)
    logits, tokens, pre, cache, indices = evict_and_decode(model, ids, cfg, steps=1)
    assert tokens[0] == pre.obs.logits.argmax(-1).item()  # the first token comes from the prefill logits
    if budget >= L:
        assert indices is None
        return
    n_layers, H = model.args.n_layers, model.args.n_kv_heads
    per_head = torch.stack([(idx < L).sum(-1) for idx in indices])  # [layers, B, H]
    for idx in indices:
        for h in range(H):
            row = idx[0, h][idx[0, h] < L]
            assert torch.equal(row, row.unique(sorted=True)), "indices must be sorted and unique"
            assert (idx[0, h][len(row):] == L).all(), "padding sits at the end"
    if method in ("streaming", "h2o", "snapkv", "laq", "laqpp"):
        assert (per_head == budget).all()
    elif method == "pyramidkv":
        budgets = lqc.budgets_pyramid(n_layers, budget, cfg.window, cfg.beta)
        if max(budgets) < L:
            assert per_head.sum().item() == n_layers * H * budget
    else:  # adakv: each layer's total is preserved, heads may differ
        assert (per_head.sum(-1) == H * budget).all()
    window = {"streaming": budget - min(4, budget), "laq": 0, "laqpp": 4}.get(method, cfg.window)
    window = min(window, int(per_head.min()))
    for idx in indices:
        for h in range(H):
            assert set(range(L - window, L)) <= set(idx[0, h].tolist())
    if method == "streaming":
        for idx in indices:
            assert set(range(min(4, budget))) <= set(idx[0, 0].tolist())
    for l, idx in enumerate(indices):  # no pseudo token survives; the one decoded token sits after
        assert cache.pos[l][..., : idx.shape[-1]].max() < L and (cache.pos[l][..., idx.shape[-1]:] == L).all()


@FAST
@given(L=st.integers(12, 70), budget=st.integers(2, 30), group=GROUPS, method=st.sampled_from(EVICTING))
def test_compacted_cache_equals_full_cache_with_evicted_positions_masked(L, budget, group, method):
    model = tiny(*group)
    ids = rand_ids(model, L, budget)
    cfg = small_cfg(method, budget)
    logits, tokens, pre, cache, indices = evict_and_decode(model, ids, cfg, steps=5)
    if indices is None:
        return
    # the full cache, with every evicted entry hidden by its position (-1 = never attended)
    masked = M.KVCache(model.args.n_layers)
    for l, idx in enumerate(indices):
        keep = torch.zeros(1, model.args.n_kv_heads, L + 1, dtype=torch.bool).scatter_(2, idx, True)[..., :L]
        masked.k[l], masked.v[l] = pre.cache.k[l][:, :, :L].clone(), pre.cache.v[l][:, :, :L].clone()
        masked.pos[l] = torch.where(keep, pre.cache.pos[l][:, :, :L], -1)
    for i, tok in enumerate(tokens):
        ref = model(torch.tensor([[tok]]), torch.tensor([[L + i]]), masked)[:, -1]
        torch.testing.assert_close(logits[i + 1], ref, atol=1e-5, rtol=1e-5)


@FAST
@given(T=st.integers(1, 9), L=st.integers(1, 40), group=GROUPS, seed=st.integers(0, 100))
def test_gqa_scores_equal_repeated_keys_summed_over_groups(T, L, group, seed):
    Hq, Hkv = group
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, Hq, T, 16, generator=g), torch.randn(2, Hkv, L, 16, generator=g)
    q_pos = torch.randint(0, L, (2, T), generator=g)
    k_pos = torch.arange(L).expand(2, Hkv, L)
    got = lqc.attention_mass(q, k, q_pos, k_pos)  # [2, H_kv, L]
    k_rep = k.repeat_interleave(Hq // Hkv, dim=1)  # [2, H_q, L, D]: the way the authors' code does it
    att = (q @ k_rep.transpose(-1, -2)) / 4.0
    att = att.masked_fill(torch.arange(L)[None, None, None, :] > q_pos[:, None, :, None], float("-inf")).softmax(-1)
    want = att.sum(2).view(2, Hkv, Hq // Hkv, L).sum(2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@FAST
@given(L=st.integers(2, 70), chunk=st.integers(1, 30), group=GROUPS)
def test_chunked_h2o_mass_equals_dense(L, chunk, group):
    model = tiny(*group)
    ids = rand_ids(model, L, chunk)
    pre = D.prefill(model, ids, chunk=chunk, h2o=True)
    _, qs = model(ids, torch.arange(L)[None], model.new_cache(), return_queries=True)
    for l, q in enumerate(qs):  # dense: the whole L x L causal attention at once
        k = pre.cache.k[l].repeat_interleave(group[0] // group[1], dim=1)
        att = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        want = att.softmax(-1).sum(2).view(1, group[1], -1, L).sum(2)
        torch.testing.assert_close(pre.obs.mass[l], want, atol=1e-4, rtol=1e-5)


def test_laq_lookahead_leaves_no_trace_and_uses_true_positions():
    model = tiny(4, 2)
    L = 50
    ids = rand_ids(model, L)
    pre = D.prefill(model, ids, chunk=16, keep_queries=32)
    before = [(k.clone(), v.clone(), p.clone()) for k, v, p in zip(pre.cache.k, pre.cache.v, pre.cache.pos)]
    snap = [lqc.select(lqc.score_snapkv(pre.obs.obs_q[l], pre.cache.k[l], pre.obs.obs_pos, pre.cache.pos[l], window=32),
                       20, 32) for l in range(2)]
    pq, ppos, ptok = lqc.lookahead(query_step(model, pre.cache.gather(snap)), pre.obs.logits, torch.tensor([L]), 5)
    assert ppos.tolist() == [[50, 51, 52, 53, 54]] and pq[0].shape == (1, 4, 5, 16) and ptok.shape == (1, 6)
    for (k, v, p), k2, v2, p2 in zip(before, pre.cache.k, pre.cache.v, pre.cache.pos):
        assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(p, p2)
    # the pseudo queries are the queries a real decode on the compressed cache would make
    scratch = pre.cache.gather(snap)
    tok = pre.obs.logits.argmax(-1)
    _, q0 = model(tok[:, None], torch.tensor([[L]]), scratch, return_queries=True)
    torch.testing.assert_close(pq[1][:, :, :1], q0[1])
    # stops at EOS: make the second pseudo token an EOS
    second = model(tok[:, None], torch.tensor([[L]]), pre.cache.gather(snap))[:, -1].argmax(-1).item()
    pq, ppos, ptok = lqc.lookahead(query_step(model, pre.cache.gather(snap)), pre.obs.logits, torch.tensor([L]), 5,
                                   eos_ids=(second,))
    assert ppos.shape[1] == 1 and ptok.tolist() == [[tok.item(), second]]  # the pseudo tokens end with the EOS


def test_select_ragged_and_budget_allocators():
    scores = torch.tensor([[[5.0, 1, 4, 0, 9, 2], [0, 0, 7, 8, 1, 3]]])  # [1, 2, 6]
    idx = lqc.select(scores, torch.tensor([[3, 1]]), keep_last=1)
    assert idx.tolist() == [[[0, 4, 5], [5, 6, 6]]]
    assert lqc.select(scores, 2, keep_last=0).tolist() == [[[0, 4], [2, 3]]]
    for n_layers, budget, window in [(30, 256, 32), (16, 64, 8), (5, 33, 32), (3, 10, 0)]:
        b = lqc.budgets_pyramid(n_layers, budget, window)
        assert sum(b) == n_layers * budget and b == sorted(b, reverse=True) and min(b) >= window
    s = torch.rand(2, 3, 100)
    s[..., -8:] = float("inf")
    ada = lqc.budgets_adakv(s, 20, keep_last=8, alpha=0.2)
    assert (ada.sum(-1) == 60).all() and (ada >= 8 + 2).all()
    s[:, 0, :92] *= 100  # one head dominates: it takes the lion's share
    ada = lqc.budgets_adakv(s, 20, keep_last=8, alpha=0.2)
    assert (ada[:, 0] > 30).all() and (ada[:, 1:] >= 10).all()


def test_pooling_and_window_in_scores():
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 1, 30, 16)
    pos = torch.arange(22, 30)[None]
    kpos = torch.arange(30).expand(1, 1, 30)
    s = lqc.score_snapkv(q, k, pos, kpos, window=8, kernel=7)
    assert torch.isinf(s[..., -8:]).all() and torch.isfinite(s[..., :-8]).all()
    raw = lqc.attention_mass(q, k, pos, kpos)[..., :-8]
    assert torch.allclose(s[..., :-8], torch.nn.functional.max_pool1d(raw, 7, 1, 3))
    # LAQ: pseudo queries see every prompt key; LAQ++ adds the suffix queries and keeps their keys
    laq = lqc.score_laq(q[:, :, :3], k, torch.tensor([[30, 31, 32]]), kpos, kernel=1)
    assert torch.isfinite(laq).all() and torch.allclose(laq.sum(), torch.tensor(6.0))
    laqpp = lqc.score_laq(q[:, :, :3], k, torch.tensor([[30, 31, 32]]), kpos, suffix_q=q[:, :, 3:], suffix_pos=pos[:, 3:],
                          kernel=1)
    assert torch.isinf(laqpp[..., -5:]).all()


def test_evict_config_validation():
    with pytest.raises(ValueError, match="budget must be > 0"):
        lqc.EvictConfig(method="snapkv", budget=0)
    with pytest.raises(ValueError, match="unknown method"):
        lqc.EvictConfig(method="magic", budget=8)


# ----------------------------------------------------------------------------------------------
# eval.py

import eval as E


@pytest.mark.parametrize("name", [t for t in E.TASKS if t != E.LONG_ANSWER])
def test_task_generators_are_deterministic_and_hide_the_answer_at_depth(smollm2, name):
    _, tok = smollm2
    for depth in (0.0, 0.5, 1.0):
        a, b = E.TASKS[name](tok, 1024, depth, 0), E.TASKS[name](tok, 1024, depth, 0)
        assert a == b and a != E.TASKS[name](tok, 1024, depth, 1)
        assert a.answer.strip() in a.context[a.needle_char:a.needle_char + 120]
        rel = a.needle_char / len(a.context)
        assert abs(rel - depth) < 0.12, (name, depth, rel)
        n = len(tok.prompt_ids(a.context, chat=True, answer_prefix=a.answer_prefix))
        assert 0.8 * 1024 < n <= 1024
    texts = E.TASKS[name](tok, 1024, 0.5, 0).context.split(". ")
    assert len(set(texts)) > 0.8 * len(texts)  # varied filler, not one repeated sentence


def test_f1_and_recall_on_hand_made_cases():
    assert E.f1_score("The Eiffel tower", "eiffel tower") == 1.0
    assert E.f1_score("a red bicycle", "blue bicycle") == pytest.approx(0.5)
    assert E.f1_score("nothing here", "answer") == 0.0
    mass = [torch.tensor([[[0.5, 0.25, 0.25, 0.0]]])]  # [1, 1, 4]
    assert E.attention_recall(mass, None) == 1.0
    assert E.attention_recall(mass, [torch.tensor([[[0, 2]]])]) == pytest.approx(0.75)
    assert E.attention_recall(mass, [torch.tensor([[[1, 4]]])]) == pytest.approx(0.25)  # 4 = padding


def test_eval_end_to_end_on_tiny_model(tmp_path, tiny_ckpt, monkeypatch):
    data = tmp_path / "lb.jsonl"
    data.write_text("\n".join(json.dumps({"context": TEXT * 2, "input": "Who jumps?", "answers": ["the fox"]})
                              for _ in range(2)))
    args = E.parse_args(["--ckpt", tiny_ckpt, "--data", str(data), "--budgets", "16", "32", "--window", "8",
                         "--agree-tokens", "6", "--out", str(tmp_path / "out"), "--lookahead", "3"])
    summary = E.main(args)
    assert summary[("full", "full")]["recall"] == 1.0 and summary[("full", "full")]["kl"] == 0.0
    assert summary[("full", "full")]["agree"] == 1.0
    for m in lqc.METHODS:
        assert 0 < summary[(m, 16)]["recall"] < 1.0 and summary[(m, 16)]["kl"] > 0
        assert summary[(m, 16)]["recall"] <= summary[(m, 32)]["recall"] + 0.05
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 2 * (1 + 7 * 2)
    assert (tmp_path / "out" / "accuracy_vs_budget.png").stat().st_size > 1000
    # a budget covering the prompt: recall 1 and the full cache's outputs
    args = E.parse_args(["--ckpt", tiny_ckpt, "--data", str(data), "--budgets", "4000", "--agree-tokens", "6",
                         "--out", str(tmp_path / "out2"), "--methods", "full", "snapkv", "laqpp"])
    summary = E.main(args)
    for m in ("snapkv", "laqpp"):
        assert summary[(m, 4000)]["recall"] == 1.0 and summary[(m, 4000)]["agree"] == 1.0


def test_listing_task_holds_every_code_and_scores_what_is_written(smollm2):
    _, tok = smollm2
    task = E.make_listing(tok, 900, 0.5, 0)
    assert task == E.make_listing(tok, 900, 0.5, 0) and task != E.make_listing(tok, 900, 0.5, 1)
    assert len(task.values) == 48 and all(f"Code {i + 1} is {v}." in task.context for i, v in enumerate(task.values))
    n = len(tok.prompt_ids(task.context, chat=tok.chat_format is not None, answer_prefix=task.answer_prefix))
    assert 0.8 * 900 < n <= 900
    right = "\n".join(f"Code {i + 1} is {v}." for i, v in enumerate(task.values))
    assert E.listing_score(right, task.values) == 1.0
    half = "\n".join(f"Code {i + 1} is {v if i % 2 else '1'}." for i, v in enumerate(task.values))
    assert E.listing_score(half, task.values) == 0.5


def test_long_answer_eval_on_tiny_model(tmp_path, tiny_ckpt):
    args = E.parse_args(["--ckpt", tiny_ckpt, "--tasks", "listing", "--lengths", "990", "--budgets", "64", "1024",
                         "--answer-tokens", "24", "--evict-every", "8", "--window", "8", "--lookahead", "3",
                         "--methods", "full", "snapkv", "laq", "h2o", "streaming", "--out", str(tmp_path / "out")])
    summary = E.main(args)
    assert summary[("full", "full")]["agree"] == 1.0 and summary[("full", "full")]["kl"] == 0.0
    for m in ("snapkv", "laq", "h2o", "streaming"):
        # a limit above prompt + answer never evicts: the full cache's answer, token for token
        assert summary[(m, 1024)]["agree"] == 1.0 and summary[(m, 1024)]["kl"] < 1e-6
        assert summary[(m, 64)]["kl"] > 0 and summary[(m, 64)]["evict_share"] > 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 1 + 4 * 2
    assert "cache limit" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_forced_logits_under_a_limit_replay_free_decoding(tiny_ckpt, method):
    """Teacher-forcing a method's own greedy answer under the limit gives back that answer: the
    forced run evicts exactly as free decoding did."""
    model, _ = C.load(tiny_ckpt)
    pre = D.prefill(model, rand_ids(model, 200), keep_queries=8, h2o=lqc.METHODS[method].needs_mass)
    cfg = small_cfg(method, 48)
    evicted, _ = D.evict(cfg, model, pre)
    cache = evicted.clone()
    ev = E.limited(model, cfg, pre, cache, limit=48, every=8)
    out = D.decode(model, cache, pre.obs.logits, pre.obs.next_pos, max_new_tokens=40, step=ev.step, evictor=ev)[0]
    assert ev.evictions >= 4
    forced = E.limited(model, cfg, pre, evicted, limit=48, every=8)
    tf = E.forced_limited_logits(evicted, forced, first_logits=pre.obs.logits, tokens=out, next_pos=200)
    assert tf.argmax(-1).tolist() == out and forced.evictions == ev.evictions


def test_bench_peers_on_tiny_model(tmp_path, tiny_ckpt):
    """bench.py --peers end to end: lqc, transformers and kvpress on the same tiny checkpoint, with
    decode ms/token timed per token (a transformers streamer, lqc's on_token)."""
    pytest.importorskip("kvpress")
    import bench as B
    args = B.parse_args(["--ckpt", tiny_ckpt, "--peers", "--lengths", "96", "--peer-budget", "32", "--window", "8",
                         "--reps", "1", "--peer-tokens", "5", "--out", str(tmp_path / "b")])
    rows = B.main(args)
    assert [r["system"] for r in rows] == ["lqc full", "transformers full", "lqc snapkv 32", "kvpress SnapKVPress 32",
                                           "lqc full fused", "lqc snapkv 32 fused"]  # fused: --compile's prefill
    assert args.prefill_compile_s > 0
    for r in rows:
        assert 0 < r["prefill_s"] < r["end_to_end_s"] and 0 < r["decode_ms"] < 1000 * r["end_to_end_s"]
    assert "kvpress SnapKVPress 32" in (tmp_path / "b" / "peers.md").read_text()


def test_prefix_agreement_counts_the_end_of_the_answer():
    assert E.prefix_agreement([], []) == 1.0  # both stopped at once
    assert E.prefix_agreement([5], []) == 0.0
    assert E.prefix_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert E.prefix_agreement([1, 2, 4], [1, 2, 3]) == 0.5
    assert E.prefix_agreement([1, 2, 3, 4], [1, 2, 3]) == 0.75  # went on past the full cache's EOS


# ----------------------------------------------------------------------------------------------
# The fast path equals the readable path

def readable_row(model, ids, cfg, steps, eos_ids=()):
    """The reference: one prompt, per-layer eviction, the growing KVCache."""
    L = len(ids)
    pre = D.prefill(model, torch.tensor([ids]), chunk=16, keep_queries=cfg.obs_window, h2o=cfg.needs_mass)
    cache, _ = D.evict(cfg, model, pre, eos_ids=eos_ids)
    kept = [[set(p[0, h][p[0, h] >= 0].tolist()) for h in range(p.shape[1])] for p in cache.pos]
    seen = []
    step = lambda t, p, c: (seen.append(model(t, p, c)[:, -1]) or seen[-1], None)  # the decode step's (logits, queries)
    toks = D.decode(model, cache, pre.obs.logits, torch.tensor([L]), max_new_tokens=steps, step=step)[0]
    return kept, [pre.obs.logits[0]] + [s[0] for s in seen], toks


def fast_batch(model, prompts, cfg, steps, flex=False, eos_ids=()):
    B, L = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts])
    x = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    next_pos = torch.tensor([len(p) for p in prompts])
    pre = D.prefill(model, x, chunk=16, keep_queries=cfg.obs_window, h2o=cfg.needs_mass, pad=pad)
    fast = FastPath(make_step(model, compile=False), max(steps, cfg.lookahead), flex=flex)
    cache, _ = D.evict(cfg, model, pre, eos_ids=eos_ids, fast=fast)  # the lookahead over a static cache
    static = fast.pack(model, cache)
    kept = [[[set(p[b, h][p[b, h] >= 0].tolist()) for h in range(p.shape[1])] for p in static.pos] for b in range(B)]
    seen = []
    step = lambda t, p, c: (seen.append(model(t, p, c)[:, -1]) or seen[-1], None)  # the decode step's (logits, queries)
    toks = D.decode(model, static, pre.obs.logits, next_pos, max_new_tokens=steps, step=step)
    return kept, [[pre.obs.logits[b]] + [s[b] for s in seen] for b in range(B)], toks


@settings(max_examples=examples(10), deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(lengths=st.lists(st.integers(10, 60), min_size=1, max_size=3), budget=st.integers(3, 40), group=GROUPS,
       method=st.sampled_from(lqc.method_names()), seed=st.integers(0, 5))
def test_fast_path_equals_readable_path(lengths, budget, group, method, seed):
    model = tiny(*group, n_layers=3)
    cfg = small_cfg(method, budget)
    prompts = [rand_ids(model, n, seed + i)[0].tolist() for i, n in enumerate(lengths)]
    kept, logits, toks = fast_batch(model, prompts, cfg, steps=32)
    for b, ids in enumerate(prompts):  # every row as if it were alone
        ref_kept, ref_logits, ref_toks = readable_row(model, ids, cfg, steps=32)
        assert kept[b] == ref_kept, f"row {b}: kept positions differ"
        assert toks[b] == ref_toks
        for a, r in zip(logits[b], ref_logits):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def readable_batch(model, prompts, cfg, steps, eos_ids=()):
    """The readable path (growing KVCache, per-layer eviction) on a left-padded batch."""
    x, pad = D.left_pad(prompts, "cpu")
    pre = D.prefill(model, x, chunk=16, keep_queries=cfg.obs_window, h2o=cfg.needs_mass, pad=pad)
    cache, _ = D.evict(cfg, model, pre, eos_ids=eos_ids)
    kept = [[[set(p[b, h][p[b, h] >= 0].tolist()) for h in range(p.shape[1])] for p in cache.pos]
            for b in range(len(prompts))]
    return kept, D.decode(model, cache, pre.obs.logits, pre.obs.next_pos, max_new_tokens=steps, eos_ids=eos_ids)


@settings(max_examples=examples(10), deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(lengths=st.lists(st.integers(5, 60), min_size=2, max_size=3), budget=st.integers(3, 40), group=GROUPS,
       method=st.sampled_from(lqc.method_names()), seed=st.integers(0, 5))
@example(lengths=[60, 41], budget=12, group=(4, 2), method="adakv", seed=0)  # padding leaked into Ada-KV's shares
@example(lengths=[50, 20], budget=32, group=(4, 2), method="pyramidkv", seed=1)  # a short row lost its recent entries
def test_readable_batch_equals_each_row_alone(lengths, budget, group, method, seed):
    model = tiny(*group, n_layers=3)
    cfg = small_cfg(method, budget)
    prompts = [rand_ids(model, n, seed + i)[0].tolist() for i, n in enumerate(lengths)]
    kept, toks = readable_batch(model, prompts, cfg, steps=8)
    for b, ids in enumerate(prompts):
        ref_kept, _, ref_toks = readable_row(model, ids, cfg, steps=8)
        assert kept[b] == ref_kept, f"row {b}: kept positions differ"
        assert toks[b] == ref_toks


@pytest.mark.parametrize("method", EVICTING)
def test_budget_below_prompt_below_window_keeps_the_budget(method):
    # budget < prompt length <= observation window used to crash in max_pool1d on an empty tensor
    model = tiny(4, 2)
    for L, budget in [(10, 4), (32, 31), (5, 1)]:
        cfg = lqc.EvictConfig(method=method, budget=budget, window=32, window_laqpp=32, lookahead=2)
        _, _, _, cache, indices = evict_and_decode(model, rand_ids(model, L, L), cfg, steps=2)
        assert indices is not None
        # every layer and head keeps the budget (PyramidKV too: a window covering the budget leaves no
        # share to move between layers)
        for idx in indices:
            kept = (idx < L).sum(-1)
            assert (kept == budget).all(), (L, budget, kept)


@pytest.mark.parametrize("method", ["snapkv", "laqpp", "pyramidkv"])
def test_one_pass_causal_prefill_equals_the_chunked_masked_one(method):
    model = tiny(4, 2, n_layers=3)
    cfg = small_cfg(method, 10)
    ids = rand_ids(model, 45, 4)
    fast = D.prefill(model, ids, keep_queries=cfg.obs_window)  # one pass, no mask
    ref = D.prefill(model, ids, chunk=7, keep_queries=cfg.obs_window)  # chunks with the position mask
    torch.testing.assert_close(fast.obs.logits, ref.obs.logits, atol=1e-5, rtol=1e-5)
    for a, b in [(fast.cache.k, ref.cache.k), (fast.cache.v, ref.cache.v), (fast.obs.obs_q, ref.obs.obs_q)]:
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(fast.cache.pos, ref.cache.pos))
    assert torch.equal(fast.obs.obs_pos, ref.obs.obs_pos)
    _, kept_fast = D.evict(cfg, model, fast)
    _, kept_ref = D.evict(cfg, model, ref)
    assert all(torch.equal(x, y) for x, y in zip(kept_fast, kept_ref))
    # a left-padded batch takes the masked path and still equals each row alone
    kept, _ = readable_batch(model, [ids[0].tolist(), ids[0, :30].tolist()], cfg, steps=1)
    assert kept[0] == [[set(i[0, h].tolist()) for h in range(i.shape[1])] for i in kept_fast]


@pytest.mark.parametrize("keep_queries, chunk, padded", [(0, None, False), (6, None, False), (6, 7, False), (6, 7, True)])
def test_prefill_skipping_the_last_layers_other_tokens_equals_the_full_forward(keep_queries, chunk, padded):
    """A prefill runs the last layer's attention and MLP only for the tokens whose logits it keeps;
    the last logits, every layer's cache and the kept queries equal those of a forward that
    computes every token's outputs."""
    model = tiny(4, 2, n_layers=3)
    if padded:
        ids, pad = D.left_pad([rand_ids(model, 40)[0].tolist(), rand_ids(model, 29, 1)[0].tolist()], "cpu")
    else:
        ids, pad = rand_ids(model, 40), None
    pre = D.prefill(model, ids, chunk=chunk, keep_queries=keep_queries, pad=pad)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    pos = pos if pad is None else (pos - pad[:, None]).clamp(min=-1)
    ref_cache = model.new_cache()
    with torch.no_grad():
        logits, queries = model(ids, pos, ref_cache, return_queries=True)
    torch.testing.assert_close(pre.obs.logits, logits[:, -1], atol=1e-5, rtol=1e-5)
    for a, b in [(pre.cache.k, ref_cache.k), (pre.cache.v, ref_cache.v)]:
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(pre.cache.pos, ref_cache.pos))
    if keep_queries:
        for x, y in zip(pre.obs.obs_q, queries):
            torch.testing.assert_close(x, y[:, :, -keep_queries:], atol=1e-5, rtol=1e-5)
    # and the last layer really skipped them: its MLP sees only the kept tokens, the others all
    seen = []
    for block in model.layers:
        block.feed_forward.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        model(ids, pos, model.new_cache(), return_queries=True, last_logits=2, last_queries=5)
    assert seen == [ids.shape[1]] * (len(model.layers) - 1) + [2]


def test_readable_cache_appends_in_place_and_equals_concatenation():
    """KVCache.update writes decode tokens into buffers with room (no copy of the whole cache per
    token); its entries equal plain concatenation, through rewinds, gathers and clones."""
    g = torch.Generator().manual_seed(0)
    kv = lambda T: (torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 4, generator=g))
    cache, ref = M.KVCache(1), {"k": [], "v": [], "pos": []}
    def add(T, start):
        k, v = kv(T)
        pos = torch.arange(start, start + T).expand(2, T)
        before = [t.clone() for t in (cache.k[0], cache.v[0])] if cache.k[0] is not None else None
        old = (cache.k[0], cache.v[0])
        cache.update(0, k, v, pos)
        if before is not None:  # views handed out earlier still read what they read
            assert all(torch.equal(a, b) for a, b in zip(old, before))
        ref["k"].append(k), ref["v"].append(v), ref["pos"].append(pos[:, None].expand(2, 3, T))
    def check():
        for name in ("k", "v", "pos"):
            assert torch.equal(getattr(cache, name)[0], torch.cat(ref[name], 2))
    add(10, 0)
    add(1, 10)
    ptr = cache.k[0].data_ptr()
    for t in range(11, 40):
        add(1, t)
        check()
    assert cache.k[0].data_ptr() == ptr  # appended in place: no reallocation within the room
    cache.rewind(torch.tensor([30, 30]))
    ref = {n: [torch.cat(r, 2)[:, :, :30]] for n, r in ref.items()}
    check()
    add(2, 30)
    check()
    # a rewind keeps the room: the tokens after it are written in place, over the rejected entries
    # (verify mode rewinds every round; nothing reads a rejected entry again)
    assert cache.k[0].data_ptr() == ptr
    kept = cache.gather([torch.arange(0, 32, 2).expand(2, 3, 16)])
    assert torch.equal(kept.k[0], cache.k[0][:, :, ::2])
    twin = cache.clone()
    add(1, 32)
    check()
    assert twin.k[0].shape[2] == 32  # the clone did not see the new token
    # under a decode-time limit, appends allocate no room past it
    cache.max_width = 40
    cache.compact([torch.arange(0, 33, 3).expand(2, 3, 11)])
    ref = {n: [torch.cat(r, 2)[:, :, 0:33:3]] for n, r in ref.items()}
    add(1, 33)
    check()
    assert cache.room[0][0].shape[2] == 40


def test_readme_paste_example(tmp_path):
    """The README's "paste lqc.py" block runs with only lqc.py beside it."""
    import re
    import shutil
    readme = (Path(__file__).parent / "README.md").read_text()
    block = re.search(r"<!-- paste-example:.*?-->\n```python\n(.*?)```", readme, re.S).group(1)
    shutil.copy(Path(__file__).parent / "lqc.py", tmp_path / "lqc.py")
    (tmp_path / "example.py").write_text("import torch\ntorch.manual_seed(0)\n" + block)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-s", "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kept = [int(x) for x in re.findall(r"-?\d+", r.stdout)]
    assert len(kept) == 10 and kept == sorted(kept) and all(0 <= p < 300 for p in kept)


def test_rope_frequencies_and_static_cache_survive_dtype_moves():
    model = tiny(4, 2).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, M.rope_inv_freq(model.args), atol=0, rtol=0)
    static = M.StaticKVCache(2, 1, 2, 8, 16, 2, torch.float32, "cpu").to(torch.float64)
    k = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    static.update(0, k, k, torch.tensor([[0, 1, 2]]))
    assert static.k[0].dtype == torch.float64 and torch.equal(static.k[0][:, :, :3], k)
    assert static.length[0].tolist() == [[3, 3]]


def test_pasted_lqc_py_runs_alone(tmp_path):
    """lqc.py copied alone into an empty folder: score -> select -> gather and the lookahead with a
    toy step function, with only torch."""
    import shutil
    shutil.copy(Path(__file__).parent / "lqc.py", tmp_path / "lqc.py")
    script = """
import torch, lqc
assert lqc.__file__.startswith(%r)
g = torch.Generator().manual_seed(0)
B, Hq, Hkv, L, D, V = 1, 4, 2, 40, 8, 11
k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
pos = torch.arange(L).expand(B, Hkv, L)
q = torch.randn(B, Hq, 8, D, generator=g)
scores = lqc.score_snapkv(q, k, torch.arange(L - 8, L)[None], pos, window=8)
idx = lqc.select(scores, 12, keep_last=8)
k2, v2, pos2 = lqc.gather(idx, k, v, pos)
assert k2.shape == (B, Hkv, 12, D) and pos2[0, 0, -8:].tolist() == list(range(32, 40))
wq, wo = torch.randn(V, Hq * D, generator=g), torch.randn(Hq * D, V, generator=g)
def step(tokens, p):  # a toy model: queries and logits from the token alone
    qs = wq[tokens[:, 0]].view(B, Hq, 1, D)
    return qs.flatten(1) @ wo, [qs, qs]
pq, pp, pt = lqc.lookahead(step, torch.randn(B, V, generator=g), torch.tensor([L]), 4)
assert len(pq) == 2 and pq[0].shape == (B, Hq, 4, D) and pp.tolist() == [[40, 41, 42, 43]] and pt.shape == (B, 5)
laq = lqc.select(lqc.score_laq(pq[0], k, pp, pos), 12)
print("ok", lqc.gather(laq, k, v, pos)[0].shape[2])
""" % str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-s", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok 12", r.stderr
    imports = [l for l in (tmp_path / "lqc.py").read_text().splitlines() if l.startswith(("import ", "from "))]
    assert all(l.split()[1].split(".")[0] in ("__future__", "math", "dataclasses", "typing", "torch") for l in imports)


@pytest.mark.parametrize("method,budget", [("snapkv", 12), ("adakv", 12), ("pyramidkv", 12), ("laqpp", 9)])
def test_flex_attention_matches_dense_on_ragged_static_cache(method, budget):
    model = tiny(6, 2, n_layers=3)
    prompts = [rand_ids(model, 41, 1)[0].tolist(), rand_ids(model, 29, 2)[0].tolist()]
    cfg = small_cfg(method, budget)
    with torch.no_grad():
        dense = fast_batch(model, prompts, cfg, steps=6, flex=False)
        flex = fast_batch(model, prompts, cfg, steps=6, flex=True)
    assert dense[0] == flex[0] and dense[2] == flex[2]
    for a, b in zip(dense[1], flex[1]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_mask_mod_feeds_both_the_dense_mask_and_the_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask, create_mask
    B, Hkv, G_, C = 2, 2, 3, 384
    static = M.StaticKVCache(1, B, Hkv, C, 16, G_, torch.float32, "cpu")
    lengths = torch.tensor([[5, 130], [200, 0]])
    for b in range(B):
        for h in range(Hkv):
            static.pos[0][b, h, :lengths[b, h]] = torch.arange(lengths[b, h])
    static.length[0].copy_(lengths)
    q_pos = torch.tensor([[300], [300]])
    mod = M.cache_mask_mod(static.pos[0], q_pos, G_)
    dense = create_mask(mod, B, Hkv * G_, 1, C, device="cpu")  # [B, H_q, 1, C]
    want = M.position_mask(static.pos[0], q_pos).repeat_interleave(G_, dim=1)
    assert torch.equal(dense, want)
    ours = static.block_mask(0, q_pos)
    ref = create_block_mask(mod, B, Hkv * G_, 1, C, device="cpu")
    # ours visits every block the reference needs, and no block past a head's length
    assert torch.equal(ours.to_dense() | ref.to_dense(), ours.to_dense())
    assert ours.kv_num_blocks[:, ::G_, 0].tolist() == [[1, 2], [2, 0]]


@pytest.mark.parametrize("method", ["snapkv", "laqpp"])
def test_compiled_decode_step_compiles_once(method):
    # for LAQ the same compiled step also runs the lookahead, over a static copy of one capacity
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny(4, 2)
    ids = rand_ids(model, 40)[0].tolist()
    cfg = small_cfg(method, 16)
    ref, _ = D.run(model, ids, cfg, max_new_tokens=20)
    graphs = []
    compiled = make_step(model, compile=True)

    def step(t, p, c):
        out = compiled(t, p, c)
        graphs.append(counters["stats"]["unique_graphs"])
        return out
    for reuse in (False, True):  # reuse: each accepted pseudo token saves one step
        graphs.clear()
        out, stats = D.run(model, ids, cfg, max_new_tokens=20, fast=True, compile=True, step=step, reuse=reuse)
        assert out == ref and len(graphs) == 19 + (cfg.lookahead if method == "laqpp" else 0) - stats.accepted
        assert graphs[0] >= 1 and graphs[-1] == graphs[0], f"recompiled: {graphs}"
        assert stats.compile_s > 0 and "compile" in stats.line()
    assert stats.accepted > 0 if method == "laqpp" else stats.drafted == 0


# ----------------------------------------------------------------------------------------------
# Bounded memory: eviction during decoding (--cache-limit)

def kept_positions(cache) -> list:
    """Per row, layer and KV head, the set of positions a cache holds."""
    return [[[set(p[b, h][p[b, h] >= 0].tolist()) for h in range(p.shape[1])] for p in cache.pos]
            for b in range(cache.pos[0].shape[0])]


def limited_run(model, prompts, cfg, *, limit, every, steps, fast=False, step=None, reuse=True):
    """run_batch with a cache limit. Returns (tokens per row, kept positions at the end, per row the
    fullest head's size after every decode step)."""
    inner = step or model_step(model)
    seen = []

    def watched(t, p, c):
        out = inner(t, p, c)
        seen.append((c, c.kept().amax(dim=(0, 2)).tolist()))
        return out
    toks, stats = D.run_batch(model, prompts, cfg, max_new_tokens=steps, cache_limit=limit, evict_every=every,
                              fast=fast, step=watched, reuse=reuse)
    assert all(len(t) == steps for t in toks)
    # the eviction's time is counted when it ran (H2O's also when it adds the decode queries' mass, without evicting)
    assert stats.limit_evict_s > 0 if stats.limit_evictions else stats.limit_evict_s == 0 or cfg.needs_mass
    cache = seen[-1][0]  # the decode cache (on the fast path LAQ's lookahead steps its own copy first)
    return toks, kept_positions(cache), [n for c, n in seen if c is cache]


@FAST
@given(lengths=st.lists(st.integers(5, 50), min_size=1, max_size=2), budget=st.integers(4, 30),
       limit=st.integers(10, 30), every=st.integers(1, 9), group=GROUPS, method=st.sampled_from(EVICTING),
       fast=st.booleans())
def test_cache_never_exceeds_the_limit(lengths, budget, limit, every, group, method, fast):
    model = tiny(*group)
    cfg = small_cfg(method, budget)
    prompts = [rand_ids(model, n, i)[0].tolist() for i, n in enumerate(lengths)]
    steps = 30
    toks, kept, sizes = limited_run(model, prompts, cfg, limit=limit, every=every, steps=steps, fast=fast)
    for row in zip(*sizes):  # each row on its own: a row is evicted when it is full
        assert max(row) <= limit
        if row[0] + steps - 2 > limit:  # the answer did not fit: evictions ran, and the cache was full at times
            assert max(row) == limit and min(row[1:]) <= limit - every + 1
    keep = limit - every
    window = keep - min(cfg.sinks, keep) if method == "streaming" else min(cfg.window, keep)
    for b, n in enumerate(lengths):
        newest = n + steps - 2  # the last token written
        for heads in kept[b]:
            for pos in heads:
                assert len(pos) <= limit and max(pos) == newest
                assert set(range(newest - window + 1, newest + 1)) <= pos  # the newest entries are never evicted
                if method == "streaming":
                    assert set(range(min(cfg.sinks, n))) <= pos


@FAST
@given(L=st.integers(5, 50), budget=st.integers(4, 60), group=GROUPS, method=st.sampled_from(EVICTING),
       fast=st.booleans(), every=st.integers(1, 8))
def test_limit_that_holds_prompt_and_answer_changes_nothing(L, budget, group, method, fast, every):
    model = tiny(*group)
    cfg = small_cfg(method, budget)
    ids = rand_ids(model, L, L)[0].tolist()
    steps = 12
    ref, _ = D.run(model, ids, cfg, max_new_tokens=steps, fast=fast)
    kept0 = min(L, budget) if method not in ("pyramidkv", "adakv") else L
    limit = max(kept0 + steps - 1, every + 1)  # the tightest limit the whole answer fits in (the last token is never written)
    toks, _, sizes = limited_run(model, [ids], cfg, limit=limit, every=every, steps=steps, fast=fast)
    assert toks[0] == ref
    if method not in ("pyramidkv", "adakv"):
        assert max(sizes) == [limit] or limit == every + 1


@settings(max_examples=10, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(lengths=st.lists(st.integers(10, 60), min_size=1, max_size=2), budget=st.integers(3, 30),
       limit=st.integers(12, 30), every=st.integers(2, 8), group=GROUPS, method=st.sampled_from(EVICTING),
       seed=st.integers(0, 5))
@example(lengths=[60], budget=12, limit=26, every=4, group=(4, 2), method="adakv", seed=0)  # pooling saw holes as neighbours
def test_limit_on_static_cache_equals_readable_cache(lengths, budget, limit, every, group, method, seed):
    model = tiny(*group, n_layers=3)
    cfg = small_cfg(method, budget)
    prompts = [rand_ids(model, n, seed + i)[0].tolist() for i, n in enumerate(lengths)]
    ref_toks, ref_kept, ref_sizes = limited_run(model, prompts, cfg, limit=limit, every=every, steps=32)
    toks, kept, sizes = limited_run(model, prompts, cfg, limit=limit, every=every, steps=32, fast=True)
    assert kept == ref_kept and toks == ref_toks and sizes == ref_sizes


def kv_bytes(cache) -> int:
    """Bytes the cache's K, V and positions hold allocated (whole buffers, room included)."""
    tensors = [t for l in range(len(cache.k)) for t in (cache.k[l], cache.v[l], cache.pos[l])]
    return sum(t.untyped_storage().nbytes() for t in tensors)


@settings(max_examples=examples(8), deadline=None)
@given(L=st.integers(40, 70), limit=st.integers(12, 24), every=st.integers(1, 6), group=GROUPS,
       method=st.sampled_from(EVICTING), fast=st.booleans())
def test_limit_bounds_the_allocated_bytes(L, limit, every, group, method, fast):
    """Capacity = the limit on both caches, for every method: PyramidKV's deep-budget layers and
    Ada-KV's greedy heads are cut to it at the prompt's eviction too (budget = limit asks them for
    up to ~2x), and the readable cache's appends allocate no room past it."""
    model = tiny(*group, n_layers=3)
    cfg = small_cfg(method, limit)
    a = model.args
    itemsize = torch.get_default_dtype().itemsize
    bound = a.n_layers * a.n_kv_heads * limit * (2 * a.head_dim * itemsize + 8)  # K and V in the dtype, int64 positions
    inner, peak = model_step(model), []

    def watched(t, p, c):
        peak.append((c, kv_bytes(c)))
        return inner(t, p, c)
    D.run_batch(model, [rand_ids(model, L, L)[0].tolist()], cfg, max_new_tokens=20, cache_limit=limit,
                evict_every=every, fast=fast, step=watched)
    # the decode cache (on the fast path LAQ's lookahead first steps a scratch copy, freed after eviction)
    peak = [n for c, n in peak if c is peak[-1][0]]
    assert max(peak) <= bound, (max(peak), bound)
    if fast:  # the static cache is sized to the limit exactly
        assert max(peak) == bound


@settings(max_examples=examples(8), deadline=None)
@given(lengths=st.lists(st.integers(6, 50), min_size=2, max_size=3), budget=st.integers(4, 20),
       limit=st.integers(12, 26), every=st.integers(1, 6), group=GROUPS, method=st.sampled_from(EVICTING),
       fast=st.booleans())
@example(lengths=[8, 50], budget=16, limit=20, every=4, group=(4, 2), method="snapkv", fast=False)
def test_batch_row_under_a_limit_equals_the_row_alone(lengths, budget, limit, every, group, method, fast):
    """A row is evicted when it is full, not when the batch's fullest row is: a short prompt in a
    batch with a long one keeps what it keeps alone, token for token and entry for entry. (Plain
    decoding: with LAQ's draft reuse the rows share rounds, and a row that alone evicts nothing, so
    has no draft, decodes in the batch's draft rounds: the same tokens, other eviction points.)"""
    model = tiny(*group, n_layers=2)
    cfg = small_cfg(method, budget)
    prompts = [rand_ids(model, n, i)[0].tolist() for i, n in enumerate(lengths)]
    run = dict(limit=limit, every=every, steps=24, fast=fast, reuse=False)
    toks, kept, _ = limited_run(model, prompts, cfg, **run)
    for b, ids in enumerate(prompts):
        alone_toks, alone_kept, _ = limited_run(model, [ids], cfg, **run)
        assert toks[b] == alone_toks[0] and kept[b] == alone_kept[0], f"row {b}"


def h2o_by_hand(model, ids, *, budget, window, limit, every, steps):
    """H2O as published, written directly and slowly: every query ever run (the prompt's and the
    answer's) is kept with the keys it saw; at each eviction every cached key's attention mass is
    recomputed from scratch (fp64), and each KV head keeps its `window` newest entries plus the
    heaviest others (ties to the earlier position). The prompt is first cut to `budget` the same
    way. Returns (greedy tokens, kept positions per layer and KV head at the end)."""
    a = model.args
    group, L = a.n_heads // a.n_kv_heads, len(ids)
    cache = model.new_cache()
    logits, qs = model(torch.tensor([ids]), torch.arange(L)[None], cache, return_queries=True)
    seen = [[(qs[l][0, :, t], t, cache.k[l][0], cache.pos[l][0]) for t in range(L)] for l in range(a.n_layers)]

    def mass(l, h) -> dict:  # position -> attention it received from every query of the group that saw it
        total = {}
        for q, q_pos, k, k_pos in seen[l]:
            vis = (k_pos[h] >= 0) & (k_pos[h] <= q_pos)
            for g in range(h * group, (h + 1) * group):
                probs = torch.softmax(k[h][vis].double() @ q[g].double() / a.head_dim ** 0.5, 0)
                for p, x in zip(k_pos[h][vis].tolist(), probs.tolist()):
                    total[p] = total.get(p, 0.0) + x
        return total

    def shrink(keep):
        for l in range(a.n_layers):
            cols = []
            for h in range(a.n_kv_heads):
                pos = cache.pos[l][0, h].tolist()
                recent = sorted(pos)[-window:]
                m = mass(l, h)
                heavy = sorted((p for p in pos if p not in recent), key=lambda p: (-m[p], p))[: keep - window]
                cols.append([pos.index(p) for p in sorted(heavy + recent)])
            for buf in (cache.k, cache.v, cache.pos):
                buf[l] = torch.stack([buf[l][:, h, c] for h, c in enumerate(cols)], dim=1)

    if L > budget:
        shrink(budget)
    count, logits, toks = min(L, budget), logits[:, -1], []
    for i in range(steps):
        toks.append(int(logits.argmax()))
        if i + 1 == steps:
            break
        if count >= limit:
            shrink(limit - every)
            count = limit - every
        logits, qs = model(torch.tensor([toks[-1:]]), torch.tensor([[L + i]]), cache, return_queries=True)
        logits, count = logits[:, -1], count + 1
        for l in range(a.n_layers):
            seen[l].append((qs[l][0, :, 0], L + i, cache.k[l][0], cache.pos[l][0]))
    return toks, kept_positions(cache)[0]


@pytest.mark.parametrize("every,fast", [(1, False), (4, False), (4, True)])
def test_h2o_decode_eviction_equals_the_published_algorithm_by_hand(every, fast):
    model = tiny(4, 2)
    ids = rand_ids(model, 30, 3)[0].tolist()
    cfg = small_cfg("h2o", 14, window=4)
    ref_toks, ref_kept = h2o_by_hand(model, ids, budget=14, window=4, limit=20, every=every, steps=30)
    toks, kept, sizes = limited_run(model, [ids], cfg, limit=20, every=every, steps=30, fast=fast)
    assert max(sizes) == [20] and kept[0] == ref_kept and toks[0] == ref_toks


def test_limit_evicts_in_place_without_recompiling_the_decode_step():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny(4, 2)
    ids = rand_ids(model, 40)[0].tolist()
    cfg = small_cfg("streaming", 16)
    ref, _, ref_sizes = limited_run(model, [ids], cfg, limit=24, every=4, steps=30)
    compiled, graphs = make_step(model, compile=True), []

    def step(t, p, c):
        out = compiled(t, p, c)
        graphs.append(counters["stats"]["unique_graphs"])
        return out
    toks, _, sizes = limited_run(model, [ids], cfg, limit=24, every=4, steps=30, fast=True, step=step)
    assert toks == ref and sizes == ref_sizes and max(sizes) == [24]
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], f"recompiled: {graphs}"


# ----------------------------------------------------------------------------------------------
# lqc_hf.py: the same policies on transformers models

def hf_tiny(tmp_path, n_heads=4, n_kv_heads=2, seed=0):
    pytest.importorskip("transformers")
    return tiny_models.hf_tiny(tmp_path, n_heads=n_heads, n_kv_heads=n_kv_heads, seed=seed)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    return hf_tiny(tmp_path_factory.mktemp("hf"))


def test_transformers_model_and_lqc_model_agree(hf_pair):
    import lqc_hf
    hf, ours = hf_pair
    ids = rand_ids(ours, 57)
    with torch.no_grad():
        want = hf(ids).logits
        got = forward_all(ours, ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # and the adapter's queries are the post-RoPE queries of lqc's model
        _, q_ours = ours(ids, torch.arange(57)[None], ours.new_cache(), return_queries=True)
        with lqc_hf.capture_queries(hf) as q_hf:
            hf(ids)
        q_hf = [q[0] for q in q_hf]
    for a, b in zip(q_ours, q_hf):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", EVICTING)
def test_same_kept_indices_through_transformers(hf_pair, method):
    import lqc_hf
    from transformers import DynamicCache
    hf, ours = hf_pair
    ids = rand_ids(ours, 90, 3)
    for budget in (10, 33, 64):
        cfg = small_cfg(method, budget)
        pre = D.prefill(ours, ids, chunk=32, keep_queries=cfg.obs_window, h2o=lqc.METHODS[method].needs_mass)
        _, want = D.evict(cfg, ours, pre, eos_ids=(2,))
        press = lqc_hf.LQCPress(method, budget=budget, options=dict(window=8, window_laqpp=4, lookahead=3))
        try:
            with torch.no_grad(), press(hf):
                hf.model(input_ids=ids, past_key_values=DynamicCache())
        except ValueError:  # the indices are chosen before a ragged cache is refused
            assert method == "adakv"
        got = press.last_indices
        assert all(torch.equal(a, b) for a, b in zip(want, got)), (method, budget)


@pytest.mark.parametrize("method,budget", [("snapkv", 40), ("laq", 24), ("laqpp", 24), ("h2o", 30), ("streaming", 20),
                                           ("pyramidkv", 30)])
def test_decoding_after_compression_through_transformers_matches_lqc(hf_pair, method, budget):
    import lqc_hf
    hf, ours = hf_pair
    ids = rand_ids(ours, 80, 5)
    opts = {"window": 8, "window_laqpp": 4, "lookahead": 3}
    want, _ = D.run(ours, ids[0].tolist(), lqc.EvictConfig(method=method, budget=budget, **opts), max_new_tokens=12,
                    eos_ids=(2,))
    cache, logits, indices = lqc_hf.compress(hf, ids, method, budget, **opts)
    assert indices is not None and cache.layers[0].keys.shape[2] < 80  # physically smaller
    assert lqc_hf.greedy(hf, cache, logits, 80, 12) == want
    # the press, used the way kvpress's pipeline uses one
    from transformers import DynamicCache
    press = lqc_hf.LQCPress(method, budget=budget, options=opts)
    cache = DynamicCache()
    with torch.no_grad(), press(hf):
        out = hf.model(input_ids=ids, past_key_values=cache)
    assert [l.keys.shape[2] for l in cache.layers] == [int((i[0, 0] < 80).sum()) for i in press.last_indices]
    logits = hf.lm_head(out.last_hidden_state[:, -1]).float()
    assert lqc_hf.greedy(hf, cache, logits, 80, 12) == want


def test_press_refuses_padding_and_a_chunked_prefill_instead_of_evicting_wrongly(hf_pair):
    import lqc_hf
    from transformers import DynamicCache
    hf, ours = hf_pair
    ids = rand_ids(ours, 60, 7)
    press = lqc_hf.LQCPress("snapkv", budget=16, options={"window": 8})
    mask = torch.ones_like(ids)
    mask[:, :5] = 0  # left padding
    with pytest.raises(ValueError, match="unpadded prompts"), torch.no_grad(), press(hf):
        hf.model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache())
    cache = DynamicCache()
    with pytest.raises(ValueError, match="second prompt chunk"), torch.no_grad(), press(hf):
        hf.model(input_ids=ids[:, :30], past_key_values=cache)
        assert press.last_indices is not None  # the first chunk was compressed as a whole prompt
        hf.model(input_ids=ids[:, 30:], past_key_values=cache)
    # a prompt in one forward, then decoding steps: still compressed once, no error
    cache = DynamicCache()
    with torch.no_grad(), press(hf):
        hf.model(input_ids=ids, past_key_values=cache)
        hf.model(input_ids=ids[:, -1:], past_key_values=cache)
    assert cache.layers[0].keys.shape[2] == 17


def test_adakv_through_transformers_says_it_cannot_be_ragged(hf_pair):
    import lqc_hf
    hf, ours = hf_pair
    with pytest.raises(ValueError, match="ragged"):
        lqc_hf.compress(hf, rand_ids(ours, 80, 5), "adakv", 24, window=8)


def test_lqc_snapkv_keeps_what_kvpress_snapkv_keeps(hf_pair):
    kvpress = pytest.importorskip("kvpress")
    from transformers import DynamicCache
    hf, ours = hf_pair
    L, window, kernel = 150, 16, 5
    ids = rand_ids(ours, L, 9)
    for ratio in (0.3, 0.6, 0.8):
        press = kvpress.SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
        full, cache = DynamicCache(), DynamicCache()
        with torch.no_grad():
            hf.model(input_ids=ids, past_key_values=full)
            with press(hf):
                hf.model(input_ids=ids, past_key_values=cache)
        n_kept = cache.layers[0].keys.shape[2]
        cfg = lqc.EvictConfig(method="snapkv", budget=n_kept, window=window, kernel=kernel, pool="avg")
        pre = D.prefill(ours, ids, chunk=64, keep_queries=cfg.obs_window)
        _, ours_idx = D.evict(cfg, ours, pre)
        for l, layer in enumerate(cache.layers):
            keys_full = full.layers[l].keys  # [1, H, L, D]: find each kept key's position
            for h in range(keys_full.shape[1]):
                match = (layer.keys[0, h][:, None] == keys_full[0, h][None]).all(-1)  # [n_kept, L]
                theirs = set(match.float().argmax(-1).tolist())
                assert theirs == set(ours_idx[l][0, h].tolist()), (ratio, l, h)


@pytest.mark.parametrize("method", ["laq", "laqpp"])
@pytest.mark.parametrize("eos_at", [0, 1])  # row 0's first pseudo token (also its first real token), or its second
def test_batched_lookahead_stops_each_row_at_its_own_eos(method, eos_at):
    model = tiny(4, 2, n_layers=3)
    prompts = [rand_ids(model, 50, 11)[0].tolist(), rand_ids(model, 37, 12)[0].tolist()]
    cfg = small_cfg(method, 12, lookahead=6)
    pre = D.prefill(model, torch.tensor([prompts[0]]), chunk=16, keep_queries=cfg.obs_window)
    snap = [lqc.select(lqc.score_snapkv(q, k, pre.obs.obs_pos, p, window=8), 12, 8)
            for q, k, p in zip(pre.obs.obs_q, pre.cache.k, pre.cache.pos)]
    t0 = pre.obs.logits.argmax(-1)
    t1 = query_step(model, pre.cache.gather(snap))(t0[:, None], torch.tensor([[50]]))[0].argmax(-1)
    eos = (t0 if eos_at == 0 else t1).item()
    _, ppos, _ = lqc.lookahead(query_step(model, pre.cache.gather(snap)), pre.obs.logits, torch.tensor([50]), 6, (eos,))
    assert ppos.tolist() == [[50]]  # the first is always fed (LAQ needs a query); nothing after an EOS
    # in a batch row 0 stops early and row 1 goes on, on the readable and the static path
    for kept in (readable_batch(model, prompts, cfg, steps=2, eos_ids=(eos,))[0],
                 fast_batch(model, prompts, cfg, steps=2, eos_ids=(eos,))[0]):
        for b, ids in enumerate(prompts):
            ref_kept, _, _ = readable_row(model, ids, cfg, steps=2, eos_ids=(eos,))
            assert kept[b] == ref_kept, f"row {b}"


def test_fused_prefill_equals_the_readable_one_on_padded_batches():
    """--compile's prefill (RMSNorm, RoPE, SwiGLU and residuals compiled around the matmuls): the
    logits, the cache and the kept indices of a left-padded batch equal the eager prefill's (up to
    float rounding: kept indices exactly), one compilation serving every layer and two lengths."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]  # the count is the process's, across tests
    model = tiny(4, 2, n_layers=3)
    cfg = small_cfg("snapkv", 8)
    assert model.fuse_prefill() > 0  # compiles now, on an 8-token chunk: the time is reported apart
    fused_pair = model.fused
    for lengths in ([30, 17], [41, 12]):
        x, pad = D.left_pad([rand_ids(model, n, n)[0].tolist() for n in lengths], "cpu")
        model.fused = None
        ref = D.prefill(model, x, keep_queries=cfg.obs_window, pad=pad)
        model.fused = fused_pair
        fused = D.prefill(model, x, keep_queries=cfg.obs_window, pad=pad)
        torch.testing.assert_close(fused.obs.logits, ref.obs.logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(fused.cache.k + fused.cache.v, ref.cache.k + ref.cache.v):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        kept = [lqc.plan_eviction(cfg, p.obs, keys=p.cache.k, positions=p.cache.pos) for p in (fused, ref)]
        assert all(torch.equal(a, b) for a, b in zip(*kept))
    graphs = counters["stats"]["unique_graphs"] - before
    # qkv and mix for batch 1 (the warm-up chunk), once more each for batches, mix once for the last
    # layer's sliced input: not once per layer or per length
    assert 2 <= graphs <= 6, graphs
