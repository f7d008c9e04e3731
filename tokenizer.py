"""Tokenizers and chat formats: one Tokenizer wrapping `tokenizers` or sentencepiece, built from a
GGUF's embedded vocabulary or an HF directory (tokenizer.json / tokenizer.model), plus the chat
formats lqc writes (ChatML, Llama 3, Llama 2) and their end-of-turn tokens.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from model import CheckpointError


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` or a sentencepiece model behind encode/decode, plus the
    special ids and the chat format of the checkpoint."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: list[int], add_bos: bool,
                 chat_format: str | None = None, system_prompt: str | None = None):
        self.backend, self.kind, self.bos_id, self.eos_ids, self.add_bos = backend, kind, bos_id, eos_ids, add_bos
        self.chat_format, self.system_prompt = chat_format, system_prompt

    def encode(self, text: str) -> list[int]:
        if self.kind == "spm":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "spm":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, text: str, chat: bool, answer_prefix: str = "") -> list[int]:
        """Token ids of a user prompt, in the checkpoint's chat format when `chat` and it has one."""
        if chat and self.chat_format:
            text = format_chat(self.chat_format, text, self.system_prompt) + answer_prefix
            # chat templates write the BOS themselves where the family wants one
            return self.encode(text) if self.kind != "spm" else self._spm_with_specials(text)
        ids = self.encode(text + answer_prefix)
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def _spm_with_specials(self, text: str) -> list[int]:
        # sentencepiece does not parse <s> in text: split on it and insert the id
        parts = text.split("<s>")
        ids = self.encode(parts[0]) if parts[0] else []
        for p in parts[1:]:
            ids += [self.bos_id] + (self.encode(p) if p else [])
        return ids


def format_chat(fmt: str, user: str, system: str | None) -> str:
    if fmt == "chatml":
        sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if fmt == "llama3":
        sys_part = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        return (f"<|begin_of_text|>{sys_part}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if fmt == "llama2":
        sys_part = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"<s>[INST] {sys_part}{user.strip()} [/INST]"
    raise ValueError(f"unknown chat format {fmt!r}")


def detect_chat_format(template: str | None) -> tuple[str | None, str | None]:
    """(format, default system prompt) from a Jinja chat template, by the markers it writes."""
    if not template:
        return None, None
    if "<|im_start|>" in template:
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^<{}]+?)<\|im_end\|>", template)
        return "chatml", m.group(1) if m else None
    if "<|start_header_id|>" in template:
        return "llama3", None
    if "[INST]" in template:
        return "llama2", None
    return None, None


def _eos_ids(tok, candidates, *extra_ids) -> list[int]:
    ids = [i for i in extra_ids if i is not None]
    for t in candidates:  # end-of-turn tokens of the chat formats also end a reply
        i = tok.token_to_id(t) if hasattr(tok, "token_to_id") else None
        if i is not None and i not in ids:
            ids.append(i)
    return ids


_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")

# byte-level BPE pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(meta: dict) -> Tokenizer:
    """The tokenizer embedded in a GGUF: GPT-2-style byte-level BPE or SentencePiece-style BPE."""
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, normalizers, pre_tokenizers, AddedToken
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTok(models.BPE(vocab, merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in ("llama-bpe", "llama3"))
        if pre == "smollm":  # SmolLM splits every digit, then applies the GPT-2 regex
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = list(meta["tokenizer.ggml.scores"])
        tok = HFTok(models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=tokens[0], byte_fallback=True, fuse_unk=True))
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:
            tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)] if meta.get("tokenizer.ggml.add_space_prefix", True)
                                        else [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        raise CheckpointError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    specials = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # control and user-defined tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = _eos_ids(tok, _END_TOKENS, meta.get("tokenizer.ggml.eos_token_id"))
    fmt, system = detect_chat_format(meta.get("tokenizer.chat_template"))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    return Tokenizer(tok, "hf", bos, eos, add_bos, fmt, system)


def _spm_merges(tokens, scores, types):
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (as HF's converters do)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score, ty in zip(tokens, scores, types):
        if ty != 1 or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                merges.append((score, vocab[a], vocab[b], a, b))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for *_, a, b in merges]


def hf_tokenizer(path: Path) -> Tokenizer:
    """tokenizer.json (preferred) or tokenizer.model from an HF directory, with tokenizer_config.json."""
    cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    fmt, system = detect_chat_format(cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None)
    gen_eos = gen.get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTok
        try:
            tok = HFTok.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {e}") from None
        bos = _special_id(tok, cfg.get("bos_token"))
        eos = _eos_ids(tok, _END_TOKENS, _special_id(tok, cfg.get("eos_token")), *gen_eos)
        add_bos = bool(cfg.get("add_bos_token", False)) or _post_processor_adds_bos(path)
        return Tokenizer(tok, "hf", bos, eos, add_bos, fmt, system)
    if (path / "tokenizer.model").exists():
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / 'tokenizer.model'}: {e}") from None
        eos = [i for i in [sp.eos_id(), *gen_eos] if i is not None and i >= 0]
        return Tokenizer(sp, "spm", sp.bos_id() if sp.bos_id() >= 0 else None, list(dict.fromkeys(eos)),
                         cfg.get("add_bos_token", True), fmt, system)
    raise CheckpointError(f"no tokenizer.json or tokenizer.model in {path}")


def _special_id(tok, t):
    if isinstance(t, dict):
        t = t.get("content")
    return tok.token_to_id(t) if t else None


def _post_processor_adds_bos(path: Path) -> bool:
    # Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor, not in the config
    pp = read_json(path / "tokenizer.json").get("post_processor") or {}
    return "begin_of_text" in json.dumps(pp)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
