"""Tokenizers and chat formats: one Tokenizer wrapping `tokenizers` or sentencepiece, built from a
GGUF's embedded vocabulary or an HF directory (tokenizer.json / tokenizer.model), plus the chat
formats lqc writes (ChatML, Llama 3, Llama 2, Phi-3) and their end-of-turn tokens.

The prompt's text is text: user, system and answer-prefix text is encoded without special-token
parsing, and the chat frame's control tokens are added as ids, so `<|im_start|>` typed into a
prompt is a few ordinary tokens, never a turn boundary.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from model import CheckpointError


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` or a sentencepiece model behind encode/decode, plus the
    special ids and the chat format of the checkpoint."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: list[int], add_bos: bool,
                 chat_format: str | None = None, system_prompt: str | None = None, chat_bos: bool = False):
        self.backend, self.kind, self.bos_id, self.eos_ids, self.add_bos = backend, kind, bos_id, eos_ids, add_bos
        self.chat_format, self.system_prompt, self.chat_bos = chat_format, system_prompt, chat_bos
        self.n_embeddings: int | None = None  # set at load when the vocabulary outgrows the model's embedding
        if kind == "hf":  # added special tokens in text stay text (sentencepiece never parses them)
            backend.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: control tokens written in it are not parsed."""
        if self.kind == "spm":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == "spm":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=True)

    def vocab_size(self) -> int:
        return self.backend.get_piece_size() if self.kind == "spm" else self.backend.get_vocab_size(with_added_tokens=True)

    def prompt_ids(self, text: str, chat: bool, answer_prefix: str = "", system: str | None = None) -> list[int]:
        """Token ids of a user prompt, in the checkpoint's chat format when `chat` and it has one;
        `system` replaces the checkpoint's default system prompt."""
        if chat and self.chat_format:
            system = self.system_prompt if system is None else system
            ids = self.encode_frame([*chat_frame(self.chat_format, text, system, self.chat_bos), answer_prefix])
        else:
            ids = ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + self.encode(text + answer_prefix)
        return self.check_ids(ids)

    def check_ids(self, ids: list[int]) -> list[int]:
        """A vocabulary may hold a few tokens past the model's embedding (SmolLM2 saved by transformers:
        5 FIM tokens); only a prompt that actually contains one is refused."""
        if self.n_embeddings is not None:
            bad = next((i for i in ids if i >= self.n_embeddings), None)
            if bad is not None:
                raise CheckpointError(f"the prompt holds token {bad} ({self.decode([bad])!r}), past the model's "
                                      f"{self.n_embeddings} embeddings: remove it from the prompt")
        return ids

    def encode_frame(self, pieces: list[str]) -> list[int]:
        """Ids of a chat frame: each `Special` the vocabulary holds as a control token is its id; the
        text between them (with any `Special` it lacks) is encoded as one run, as the checkpoint's
        own template and tokenizer would split it."""
        ids, run = [], ""
        for piece in pieces:
            i = self.control_id(piece) if isinstance(piece, Special) else None
            if i is None:
                run += piece
                continue
            ids += self.encode(run) if run else []
            ids.append(i)
            run = ""
        return ids + (self.encode(run) if run else [])

    def control_id(self, token: str) -> int | None:
        """The id of an added / control token, None when the vocabulary has no such token."""
        if self.kind == "spm":
            i = self.backend.piece_to_id(token)
            return i if self.backend.is_control(i) and self.backend.id_to_piece(i) == token else None
        i = self.backend.token_to_id(token)
        return i if i is not None and i in self.backend.get_added_tokens_decoder() else None


class Special(str):
    """A control token of a chat frame (`<|im_start|>`, `<s>`): one id where the vocabulary has it
    as a control token, plain text where it does not (Llama 2's `[INST]`)."""


def chat_frame(fmt: str, user: str, system: str | None, bos: bool = False) -> list[str]:
    """A one-turn chat prompt as pieces, ending where the reply begins. `bos`: the template writes a
    BOS first (Llama 2 and 3 always do; ChatML never; Phi-3 templates differ)."""
    S = Special
    if fmt == "chatml":
        sys_part = [S("<|im_start|>"), f"system\n{system}", S("<|im_end|>"), "\n"] if system else []
        return [*sys_part, S("<|im_start|>"), f"user\n{user}", S("<|im_end|>"), "\n", S("<|im_start|>"), "assistant\n"]
    if fmt == "llama3":
        sys_part = [S("<|start_header_id|>"), "system", S("<|end_header_id|>"), f"\n\n{system}", S("<|eot_id|>")] if system else []
        return [S("<|begin_of_text|>"), *sys_part, S("<|start_header_id|>"), "user", S("<|end_header_id|>"), f"\n\n{user}",
                S("<|eot_id|>"), S("<|start_header_id|>"), "assistant", S("<|end_header_id|>"), "\n\n"]
    if fmt == "llama2":
        sys_part = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return [S("<s>"), S("[INST]"), f" {sys_part}{user.strip()} ", S("[/INST]")]
    if fmt == "phi3":
        sys_part = [S("<|system|>"), f"\n{system}", S("<|end|>"), "\n"] if system else []
        return [*([S("<s>")] if bos else []), *sys_part, S("<|user|>"), f"\n{user}", S("<|end|>"), "\n", S("<|assistant|>"), "\n"]
    raise ValueError(f"unknown chat format {fmt!r}")


def format_chat(fmt: str, user: str, system: str | None, bos: bool = False) -> str:
    """The chat frame as one string (for display; encode with `Tokenizer.prompt_ids`)."""
    return "".join(chat_frame(fmt, user, system, bos))


def detect_chat_format(template: str | None) -> tuple[str | None, str | None]:
    """(format, default system prompt) from a Jinja chat template, by the markers it writes."""
    if not template:
        return None, None
    if "<|im_start|>" in template:
        # a literal default system turn (SmolLM2, Qwen2.5); not one built from messages[0]
        m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^<{}'\"]+?)<\|im_end\|>", template)
        return "chatml", m.group(1) if m else None
    if "<|start_header_id|>" in template:
        return "llama3", None
    if "[INST]" in template:
        return "llama2", None
    if "<|user|>" in template and "<|end|>" in template:
        return "phi3", None
    return None, None


def chat_template(path: Path, cfg: Fields) -> str | None:
    """An HF directory's chat template: chat_template.jinja (transformers >= 4.43 writes it there),
    else tokenizer_config.json's `chat_template`, a string or a list of named templates."""
    if (path / "chat_template.jinja").exists():
        try:
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path / 'chat_template.jinja'}: {e}") from None
    t = cfg.data.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)} if isinstance(t, list) else {}
    if not isinstance(named.get("default"), str):
        raise cfg.error("chat_template", "must be a string or a list of {name, template} with a 'default' one")
    return named["default"]


def template_writes_bos(template: str | None) -> bool:
    return bool(template) and "bos_token" in template


# end-of-text and end-of-turn tokens of the families: any of them ends a reply
_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>")


def _eos_ids(tok, *ids) -> list[int]:
    named = [tok.token_to_id(t) for t in _END_TOKENS]
    return list(dict.fromkeys(i for i in [*ids, *named] if i is not None))


# byte-level BPE pre-tokenizer regexes by GGUF `tokenizer.ggml.pre`
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen splits every digit
_GGUF_PRE = {"default": None, "gpt2": None, "smollm": "digits", "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT}


def gguf_tokenizer(meta: Fields) -> Tokenizer:
    """The tokenizer embedded in a GGUF: GPT-2-style byte-level BPE or SentencePiece-style BPE."""
    from tokenizers import AddedToken
    tokens = meta.list("tokenizer.ggml.tokens", str)
    n = len(tokens)
    types = meta.list("tokenizer.ggml.token_type", int, default=[1] * n, length=n)
    kind = meta.str("tokenizer.ggml.model", choices=("gpt2", "llama"))
    tok = _gguf_bpe(meta, tokens) if kind == "gpt2" else _gguf_spm(meta, tokens, types)
    # llama.cpp's rule: control tokens are parsed only in the chat frame, user-defined ones in any text
    tok.add_tokens([AddedToken(t, special=ty == 3, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)])
    bos = meta.int("tokenizer.ggml.bos_token_id", None, lo=0, hi=n - 1)
    eos = _eos_ids(tok, meta.int("tokenizer.ggml.eos_token_id", None, lo=0, hi=n - 1))
    template = meta.str("tokenizer.chat_template", None)
    fmt, system = detect_chat_format(template)
    add_bos = meta.bool("tokenizer.ggml.add_bos_token", kind == "llama")
    return Tokenizer(tok, "hf", bos, eos, add_bos, fmt, system, template_writes_bos(template))


def _gguf_bpe(meta: Fields, tokens: list[str]):
    from tokenizers import Regex, Tokenizer as HFTok, decoders, models, pre_tokenizers
    merges = meta.list("tokenizer.ggml.merges", str)
    if not all(" " in m for m in merges):
        raise meta.error("tokenizer.ggml.merges", "must be strings 'left right'")
    tok = HFTok(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    split = _GGUF_PRE[meta.str("tokenizer.ggml.pre", "gpt2", choices=tuple(_GGUF_PRE))]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None or split == "digits")
    if split == "digits":  # SmolLM splits every digit, then applies the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _gguf_spm(meta: Fields, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer as HFTok, decoders, models, normalizers
    scores = meta.list("tokenizer.ggml.scores", float, length=len(tokens))
    tok = HFTok(models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, scores, types), unk_token=tokens[0],
                           byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.bool("tokenizer.ggml.add_space_prefix", True):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(steps)
    return tok


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
    """tokenizer.json (preferred) or tokenizer.model from an HF directory, with tokenizer_config.json,
    chat_template.jinja and generation_config.json where present."""
    cfg, gen = Fields.from_json(path / "tokenizer_config.json"), Fields.from_json(path / "generation_config.json")
    template = chat_template(path, cfg)
    fmt, system = detect_chat_format(template)
    gen_eos = gen.ints("eos_token_id")
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTok
        try:
            tok = HFTok.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {one_line(e)}") from None
        bos = _special_id(tok, cfg, "bos_token")
        eos = _eos_ids(tok, _special_id(tok, cfg, "eos_token"), *gen_eos)
        add_bos = cfg.bool("add_bos_token", False) or _post_processor_adds_bos(path)
        return Tokenizer(tok, "hf", bos, eos, add_bos, fmt, system, template_writes_bos(template))
    if (path / "tokenizer.model").exists():
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
        except Exception as e:
            raise CheckpointError(f"cannot read {path / 'tokenizer.model'}: {one_line(e)}") from None
        eos = [i for i in [sp.eos_id(), *gen_eos] if i >= 0]
        return Tokenizer(sp, "spm", sp.bos_id() if sp.bos_id() >= 0 else None, list(dict.fromkeys(eos)),
                         cfg.bool("add_bos_token", True), fmt, system, template_writes_bos(template))
    raise CheckpointError(f"no tokenizer.json or tokenizer.model in {path}")


def _special_id(tok, cfg: Fields, key: str) -> int | None:
    """The id of tokenizer_config.json's bos_token / eos_token (a string or {"content": ...})."""
    t = cfg.data.get(key)
    t = t.get("content") if isinstance(t, dict) else t
    if t is not None and not isinstance(t, str):
        raise cfg.error(key, f"must be a token string, got {_show(t)}")
    return tok.token_to_id(t) if t else None


def _post_processor_adds_bos(path: Path) -> bool:
    # Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor, not in the config
    pp = read_json(path / "tokenizer.json").get("post_processor") or {}
    return "begin_of_text" in json.dumps(pp)


# ----------------------------------------------------------------------------------------------
# Reading checkpoint files strictly (shared with checkpoint.py)

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_REQUIRED = object()


class Fields:
    """Typed reads from a config file or GGUF metadata. A missing key (or null) takes the default;
    a missing required key, a value of the wrong type (a string, list or bool where a number is
    needed) or out of range is a CheckpointError naming the file and the key."""

    def __init__(self, data: dict, source):
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} must be an object of fields, got {_show(data)}")
        self.data, self.source = data, str(source)

    @classmethod
    def from_json(cls, path: Path) -> "Fields":
        """A JSON file's fields; an absent optional file reads as empty."""
        return cls(read_json(path) if path.exists() else {}, path)

    def error(self, key: str, problem: str) -> CheckpointError:
        """`problem` reads after the key: "is missing", or "=4 does not divide ..." """
        return CheckpointError(f"{self.source}: {key}{'' if problem.startswith('=') else ' '}{problem}")

    def _value(self, key, default):
        v = self.data.get(key)
        if v is None and default is _REQUIRED:
            raise self.error(key, "is missing")
        return v

    def int(self, key: str, default=_REQUIRED, lo: int = 1, hi: int = 2**31 - 1):
        v = self._value(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.error(key, f"must be an integer in [{lo}, {hi}], got {_show(v)}")
        return v

    def float(self, key: str, default=_REQUIRED, hi: float = 1e12):
        """A finite number in (0, hi]."""
        v = self._value(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= hi):
            raise self.error(key, f"must be a number in (0, {hi:g}], got {_show(v)}")
        return float(v)

    def bool(self, key: str, default=_REQUIRED) -> bool:
        v = self._value(key, default)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {_show(v)}")
        return v

    def str(self, key: str, default=_REQUIRED, choices: tuple | None = None):
        v = self._value(key, default)
        if v is None:
            return default
        if not isinstance(v, str) or (choices and v not in choices):
            raise self.error(key, f"must be {'one of ' + ', '.join(choices) if choices else 'a string'}, got {_show(v)}")
        return v

    def list(self, key: str, of: type, default=_REQUIRED, length: int | None = None) -> list:
        """A non-empty list of `of` (int elements accepted for float)."""
        v = self._value(key, default)
        if v is None:
            return default
        kinds = (int, float) if of is float else of
        if not isinstance(v, list) or not v or not all(isinstance(x, kinds) and not isinstance(x, bool) for x in v):
            raise self.error(key, f"must be a non-empty list of {of.__name__}, got {_show(v)}")
        if length is not None and len(v) != length:
            raise self.error(key, f"has {len(v)} entries, expected {length}")
        return v

    def ints(self, key: str) -> list[int]:
        """An id or a list of ids (generation_config's eos_token_id); [] when absent."""
        v = self.data.get(key)
        v = [] if v is None else v if isinstance(v, list) else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            raise self.error(key, f"must be a token id or a list of them, got {_show(self.data[key])}")
        return v
