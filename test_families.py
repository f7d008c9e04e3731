"""Model families beyond Llama, checked against transformers 5.2: Qwen2/2.5 (q/k/v biases), Qwen3
(per-head q/k RMSNorm), Phi-3 (fused weights) and Mistral. Tiny random models are built and saved
by transformers in the tests (no network); GGUFs are written with the `gguf` package under
llama.cpp's tensor names (gguf's own name map, not lqc's).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import checkpoint as C
import decoding as D
import lqc
from test_checkpoint import edit_gguf
from test_cli import run_main
from test_lqc import add_gguf_tokenizer, rand_ids, small_cfg, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")

QWEN25_TEMPLATE = (  # the shape of Qwen2.5's template: a default system turn when none is given
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for m in messages %}{%- if m.role != 'system' %}{{- '<|im_start|>' + m.role + '\\n' + m.content + "
    "'<|im_end|>\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3_TEMPLATE = (  # Qwen3's: a system turn only when given
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == "
    "'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% endif %}{% endfor %}")

# family: (config class, model class, config extras, chat template, control tokens, end-of-turn token)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, QWEN25_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "<|im_end|>"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}, QWEN3_TEMPLATE,
              ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, PHI3_TEMPLATE,
             ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"], "<|end|>"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16, "sliding_window": None}, MISTRAL_TEMPLATE, [],
                "</s>"),
}
GGUF_ARCH = {"qwen2": "QWEN2", "qwen3": "QWEN3", "phi3": "PHI3"}  # llama.cpp writes Mistral as llama (test_lqc)


def hf_config(family: str, **kw):
    cfg_cls, _, extra, *_ = FAMILIES[family]
    return getattr(transformers, cfg_cls)(**{
        **dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=320, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               pad_token_id=None), **extra, **kw})


def build(family: str, path, seed=0):
    """A tiny random transformers model of the family, saved with a tokenizer and the family's chat
    template as transformers 5.2 writes them; returns (model, fast tokenizer)."""
    _, model_cls, _, template, controls, eot = FAMILIES[family]
    torch.manual_seed(seed)
    hf = getattr(transformers, model_cls)(hf_config(family)).eval()
    with torch.no_grad():  # random norms and biases, so a wrong mapping cannot hide behind ones and zeros;
        for name, p in hf.named_parameters():  # weights wider than transformers' init, for logits of a few units
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)
    hf.save_pretrained(path)
    tok = train_bpe_tokenizer()
    tok.add_special_tokens(controls)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eot, chat_template=template)
    fast.save_pretrained(path)
    return hf, fast


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    hf, fast = build(request.param, path)
    ours, tok = C.load(str(path))
    return request.param, path, hf, fast, ours, tok


def test_logits_and_queries_match_transformers(family):
    import lqc_hf
    name, _, hf, _, ours, _ = family
    ids = rand_ids(ours, 57)
    pos = torch.arange(57)[None]
    with torch.no_grad():
        got, q_ours = ours(ids, pos, ours.new_cache(), return_queries=True)
        with lqc_hf.capture_queries(hf) as q_hf:  # post-bias / q_norm / RoPE queries
            want = hf(ids).logits
        q_hf = [q[0] for q in q_hf]
    assert (got - want).abs().max().item() <= 1e-4, name
    for a, b in zip(q_ours, q_hf):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_greedy_tokens_match_transformers(family):
    _, _, hf, _, ours, _ = family
    ids = rand_ids(ours, 40, 2)
    want = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 40:].tolist()
    got, _ = D.run(ours, ids[0].tolist(), lqc.EvictConfig(method="full"), max_new_tokens=16, eos_ids=())
    assert got == want


@pytest.mark.parametrize("method", ["snapkv", "laq", "laqpp", "pyramidkv"])
def test_same_kept_indices_and_tokens_through_lqc_hf(family, method):
    import lqc_hf
    _, _, hf, _, ours, _ = family
    L, budget = 70, 24
    ids = rand_ids(ours, L, 3)
    opts = {"window": 8, "window_laqpp": 4, "lookahead": 3}
    cfg = small_cfg(method, budget)
    assert {k: getattr(cfg, k) for k in opts} == opts
    _, want = D.evict(cfg, ours, D.prefill(ours, ids, keep_queries=cfg.obs_window), eos_ids=(2,))
    cache, logits, got = lqc_hf.compress(hf, ids, method, budget, **opts)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    tokens, _ = D.run(ours, ids[0].tolist(), lqc.EvictConfig(method=method, budget=budget, **opts), max_new_tokens=8,
                      eos_ids=(2,))
    assert lqc_hf.greedy(hf, cache, logits, L, 8) == tokens


def test_chat_frame_and_eos_match_the_family(family):
    """The prompt ids equal transformers' own rendering of the family's template, tokenized; the
    family's end-of-turn and end-of-text tokens end a reply."""
    name, _, _, fast, _, tok = family
    messages = [{"role": "user", "content": "How vexingly quick daft zebras jump!"}]
    want = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tok.prompt_ids(messages[0]["content"], chat=True) == want
    ends = {"qwen2": ["<|im_end|>", "<|endoftext|>"], "qwen3": ["<|im_end|>", "<|endoftext|>"],
            "phi3": ["<|end|>", "<|endoftext|>"], "mistral": ["</s>"]}[name]
    assert all(fast.convert_tokens_to_ids(t) in tok.eos_ids for t in ends)
    if name == "qwen2":
        assert tok.system_prompt.startswith("You are Qwen")
    elif name == "qwen3":
        assert tok.system_prompt is None  # no default system turn is invented


def test_cli_runs_the_family(family, tmp_path, capsys):
    """generate.py's main in this process (test_lqc runs one real process)."""
    _, path, *_ = family
    code, _, err = run_main("generate.py", ["--prompt", "quick zebras", "--method", "laqpp", "--budget", "8", "--window",
                                            "4", "--window-laqpp", "2", "--max-new-tokens", "3"], str(path), tmp_path, capsys)
    assert code == 0 and "KV kept" in err.strip().splitlines()[-1], err


# ----------------------------------------------------------------------------------------------
# GGUF as llama.cpp writes these architectures

def save_family_gguf(hf, family: str, path, sliding_window: int | None = None):
    """The transformers model as a GGUF: metadata under the architecture's keys, tensors renamed by
    gguf's own HF -> llama.cpp name map; no Q/K permutation (llama.cpp permutes only for `llama`)."""
    import gguf
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family])
    c = hf.config
    head_dim = c.hidden_size // c.num_attention_heads if family != "qwen3" else c.head_dim
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_context_length(c.max_position_embeddings); w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if family == "qwen3":
        w.add_key_length(head_dim); w.add_value_length(head_dim)
    if family == "phi3":
        w.add_rope_dimension_count(head_dim)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    add_gguf_tokenizer(w, c.vocab_size, "llama" if family == "phi3" else "gpt2", pre="qwen2" if "qwen" in family else "default",
                       chat_template=FAMILIES[family][3], extra=FAMILIES[family][4])
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.mark.parametrize("name", list(GGUF_ARCH))
def test_gguf_of_the_family_matches_transformers(tmp_path, name):
    hf, _ = build(name, tmp_path / "hf", seed=1)
    path = save_family_gguf(hf, name, tmp_path / f"{name}.gguf")
    ours, tok = C.load(str(path))
    ids = rand_ids(ours, 45, 4)
    with torch.no_grad():
        diff = (ours(ids, torch.arange(45)[None], ours.new_cache()) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert tok.chat_format == ("phi3" if name == "phi3" else "chatml") and tok.control_id(FAMILIES[name][5]) in tok.eos_ids


def test_gguf_qwen2_pretokenizer_splits_digits_like_qwen(tmp_path):
    from tokenizers import Regex, pre_tokenizers
    hf, _ = build("qwen2", tmp_path / "hf")
    _, tok = C.load(str(save_family_gguf(hf, "qwen2", tmp_path / "q.gguf")))
    ref = train_bpe_tokenizer()  # Qwen2's tokenizer.json pre-tokenizer, written out
    qwen_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen_regex), behavior="isolated", invert=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for s in ["12345 zebras", "The quick brown fox's 67890 jugs!\n\n  judge"]:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids, s


# ----------------------------------------------------------------------------------------------
# What is refused or limited, explicitly

def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_phi3_longrope_is_refused_in_one_line(tmp_path, capsys):
    hf, _ = build("phi3", tmp_path / "d")
    edit_config(tmp_path / "d", rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    capsys.readouterr()  # transformers' progress bars while saving
    code, _, err = run_main("generate.py", ["--prompt", "hi"], str(tmp_path / "d"), tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "longrope" in lines[0] and "Traceback" not in err
    path = save_family_gguf(hf, "phi3", tmp_path / "p.gguf")
    long = edit_gguf(path, tmp_path / "long.gguf", tensors={"rope_factors_long.weight": np.ones(8, np.float32)})
    with pytest.raises(C.CheckpointError, match="rope_factors_long.weight.*LongRoPE"):
        C.load(str(long))


@pytest.mark.parametrize("name,window_config", [
    ("mistral", {"sliding_window": 48}),
    ("phi3", {"sliding_window": 48}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 48, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]}),
])
def test_sliding_window_limits_the_context(tmp_path, name, window_config, capsys):
    """A window shorter than the context is never ignored: the context is limited to the window,
    where sliding-window attention is exactly full attention (checked against transformers with
    the window on), and a longer prompt is refused in one line."""
    _, model_cls, *_ = FAMILIES[name]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(hf_config(name, **window_config)).eval()
    hf.save_pretrained(tmp_path / "d")
    train_bpe_tokenizer().save(str(tmp_path / "d" / "tokenizer.json"))
    ours, _ = C.load(str(tmp_path / "d"))
    assert ours.args.max_seq_len == 48
    ids = rand_ids(ours, 48, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, torch.arange(48)[None], ours.new_cache()), hf(ids).logits, atol=1e-4, rtol=0)
    capsys.readouterr()  # transformers' progress bars while saving
    code, _, err = run_main("generate.py", ["--prompt", "zebra " * 60, "--max-new-tokens", "2"], str(tmp_path / "d"),
                            tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "context of 48" in lines[0], err
