"""A RULER-style long-context suite, generated offline and deterministically from a seed.

After RULER (Hsieh et al., 2024, arXiv 2404.06654): needles in a haystack whose value is a number,
a word or a UUID; several keys (distractor needles), several values for one key, several keys
asked at once; variable tracking through chains of assignments; common-words and frequent-words
extraction. Haystacks are the project's own filler: RULER's repeated noise sentences, or varied
sentences that cannot be compressed away as one repetition. Scored as RULER scores them: the share
of the expected strings found (case-insensitive) in the model's answer.

No torch here: a task is text plus the strings its answer must contain; eval.py runs them.
"""
from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------
# Filler

_SUBJECTS = ["The old sailor", "A young teacher", "The baker", "My neighbour", "The mayor", "A quiet student",
             "The gardener", "An engineer", "The painter", "A traveller", "The librarian", "The doctor"]
_VERBS = ["walked along", "wrote about", "dreamed of", "painted", "photographed", "argued about", "cleaned",
          "visited", "described", "remembered", "repaired", "sang about"]
_OBJECTS = ["the river bank", "a red bicycle", "the winter market", "an empty theatre", "the northern hills",
            "a broken clock", "the harbour lights", "a field of barley", "the stone bridge", "a tall ship",
            "the village square", "a basket of apples"]
_TAILS = ["before sunrise", "in the rain", "with great care", "for many hours", "after the storm",
          "during the festival", "without a word", "at the end of summer", "once again", "with two friends"]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."  # RULER's

# keys and word values: adjective-noun pairs and nouns, as RULER draws them from a word list
_ADJECTIVES = ["ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "dusty", "eager", "faint",
               "fierce", "gentle", "glossy", "hollow", "humble", "icy", "jolly", "lively", "lonely", "mellow",
               "misty", "noisy", "odd", "pale", "proud", "rapid", "rusty", "shiny", "silent", "sleepy", "smooth",
               "solemn", "spicy", "steep", "sturdy", "swift", "tame", "tender", "tidy", "vivid", "wary", "witty"]
_NOUNS = ["anchor", "badger", "banjo", "beacon", "biscuit", "blossom", "canyon", "cactus", "cellar", "chisel",
          "cobweb", "comet", "cricket", "dagger", "dolphin", "ember", "falcon", "feather", "fossil", "garnet",
          "glacier", "gravel", "hammock", "harbor", "helmet", "iceberg", "jasmine", "kettle", "lantern", "lobster",
          "magnet", "marble", "meadow", "mitten", "nectar", "oyster", "paddle", "pebble", "pepper", "quartz",
          "quiver", "raven", "saddle", "saffron", "scarf", "thimble", "tractor", "trumpet", "tulip", "velvet",
          "violin", "walnut", "whistle", "willow", "yogurt", "zephyr"]


def filler_sentences(rng: random.Random):
    """Endless varied sentences: a random subject, verb, object and tail each time, so the text
    cannot be compressed away as one repeated sentence."""
    while True:
        yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def noise_sentences(rng: random.Random):
    while True:
        yield NOISE


HAYSTACKS = {"noise": noise_sentences, "varied": filler_sentences}


def take_filler(tok, rng: random.Random, n_tokens: int, kind: str = "varied") -> list[str]:
    """Filler sentences adding up to at most n_tokens tokens (each counted with its leading space)."""
    sents, used, sizes = [], 0, {}
    for s in HAYSTACKS[kind](rng):
        n = sizes.get(s) or sizes.setdefault(s, len(tok.encode(" " + s)))
        used += n
        if used > n_tokens:
            return sents
        sents.append(s)


# ----------------------------------------------------------------------------------------------
# Tasks

@dataclass
class Sample:
    name: str
    context: str  # the whole user message
    answer_prefix: str  # the reply starts with this
    expected: tuple  # strings the answer must contain; score = share found
    length: int  # target prompt tokens
    depth: float  # where the (first) fact sits, 0 = start, 1 = end; nan when it is spread
    max_new: int  # answer tokens to generate
    haystack: str = ""
    seed: int = 0
    needle_char: int = -1
    values: tuple = field(default=())

    @property
    def answer(self) -> str:  # the first expected string, for teacher forcing
        return " " + self.expected[0]


def score(text: str, expected) -> float:
    """RULER's string_match_all: the share of expected strings found in the answer, case-insensitive."""
    low = text.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (successes may be fractional: partial scores)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def overhead(tok, prefix: str, slack: int = 8) -> int:
    """Tokens the chat template and the answer prefix add around the user message, + slack for
    merges at the seams."""
    return len(tok.prompt_ids("", chat=tok.chat_format is not None, answer_prefix=prefix)) + slack


def _key(rng) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _value(rng, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return rng.choice(_NOUNS)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _plural(kind: str) -> str:
    return {"number": "numbers", "word": "words", "uuid": "uuids"}[kind]


def _needle(key: str, value: str, kind: str) -> str:
    return f"One of the special magic {_plural(kind)} for {key} is: {value}."


def _haystack_with(tok, rng, n_tokens: int, needles: list[tuple[float, str]], kind: str) -> tuple[str, int]:
    """Filler of about n_tokens tokens with each (depth, needle) inserted between sentences; the
    character offset of the first needle."""
    used = sum(len(tok.encode(" " + n)) for _, n in needles)
    sents = take_filler(tok, rng, n_tokens - used, kind)
    at = {}
    for depth, needle in needles:
        at.setdefault(round(depth * len(sents)), []).append(needle)
    parts, first = [], -1
    for i in range(len(sents) + 1):
        for needle in at.get(i, []):
            if first < 0:
                first = len(" ".join(parts)) + (1 if parts else 0)
            parts.append(needle)
        if i < len(sents):
            parts.append(sents[i])
    return " ".join(parts), first


def _niah_frame(kind: str, body: str, question: str) -> str:
    return (f"Some special magic {_plural(kind)} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {_plural(kind)} afterwards.\n{body}\n{question}")


def make_niah(tok, length, depth, seed, *, kind="number", n_keys=1, n_values=1, n_queries=1, haystack="varied",
              name="niah_single") -> Sample:
    """One family for every NIAH variant: n_keys keys (the others are distractors), n_values values
    for the asked key (spread through the text), n_queries keys asked at once."""
    rng = random.Random(f"{name}-{kind}-{haystack}-{length}-{depth}-{seed}")
    keys = []
    while len(keys) < max(n_keys, n_queries):
        k = _key(rng)
        keys += [k] if k not in keys else []
    values = {k: [_value(rng, kind) for _ in range(n_values if i == 0 else 1)] for i, k in enumerate(keys)}
    asked = keys[:n_queries]
    needles = [(depth, _needle(keys[0], values[keys[0]][0], kind))]
    needles += [(rng.random(), _needle(keys[0], v, kind)) for v in values[keys[0]][1:]]
    needles += [(rng.random(), _needle(k, values[k][0], kind)) for k in keys[1:]]
    what = " and ".join(asked) if n_queries > 1 else asked[0]
    if n_values > 1 or n_queries > 1:
        question = f"What are all the special magic {_plural(kind)} for {what} mentioned in the provided text?"
        prefix = f"The special magic {_plural(kind)} for {what} mentioned in the provided text are"
    else:
        question = f"What is the special magic {kind} for {what} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {what} mentioned in the provided text is"
    frame = _niah_frame(kind, "", question)
    body, first = _haystack_with(tok, rng, length - len(tok.encode(frame)) - overhead(tok, prefix), needles, haystack)
    expected = tuple(v for k in asked for v in values[k])
    per_value = {"number": 10, "word": 6, "uuid": 30}[kind]
    return Sample(name, _niah_frame(kind, body, question), prefix, expected, length, depth,
                  max_new=8 + per_value * len(expected), haystack=haystack, seed=seed,
                  needle_char=first + len(frame.split("\n")[0]) + 1 if first >= 0 else -1)


def make_vt(tok, length, depth, seed, *, haystack="varied", name="vt") -> Sample:
    """Variable tracking: a chain of 2-4 assignments (VAR A = value, VAR B = VAR A, ...) spread from
    `depth` on, and a distractor chain with another value; the answer names every variable of the chain."""
    rng = random.Random(f"{name}-{haystack}-{length}-{depth}-{seed}")
    hops = 2 + seed % 3
    names = set()
    while len(names) < 2 * hops:
        names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
    names = sorted(names)  # a set's order varies by process (string hashing): sort, then shuffle
    rng.shuffle(names)
    chain, other = names[:hops], names[hops:]
    value, decoy = str(rng.randint(10000, 99999)), str(rng.randint(10000, 99999))
    lines = lambda vs, v: [f"VAR {vs[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in zip(vs, vs[1:])]
    spots = sorted(depth + (1 - depth) * rng.random() * 0.9 for _ in range(hops))
    needles = list(zip(spots, lines(chain, value))) + [(rng.random(), s) for s in lines(other, decoy)]
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops} variables are "
              f"assigned the value {value}, they are:")
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    body, first = _haystack_with(tok, rng, length - len(tok.encode(head + question)) - overhead(tok, prefix),
                                 needles, haystack)
    return Sample(name, f"{head}{body}\n{question}", prefix, tuple(chain), length, depth, max_new=8 + 5 * hops,
                  haystack=haystack, seed=seed, needle_char=len(head) + first)


def make_cwe(tok, length, depth, seed, *, name="cwe", n_common=10, common_freq=30, rare_freq=3) -> Sample:
    """Common words extraction: a numbered list where 10 words appear 30 times each and many others 3
    times; asked for the 10 most common. The list fills the length (no haystack; depth unused)."""
    rng = random.Random(f"{name}-{length}-{seed}")
    vocab = sorted({f"{a}{b}" for a in _ADJECTIVES for b in _NOUNS})  # sorted first: a set's order varies by process
    rng.shuffle(vocab)
    common, rare = vocab[:n_common], vocab[n_common:]
    question = "Question: What are the 10 most common words in the above list?"
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
    room = length - len(tok.encode(head + question)) - overhead(tok, prefix)
    per_word = len(tok.encode(f" 100. {common[0]}"))
    # RULER's 30 repetitions from 4k tokens on; shorter lists repeat the common words less, keeping
    # them at most half the list and clearly above the rare words' 3
    common_freq = max(rare_freq + 2, min(common_freq, room // (2 * n_common * per_word)))
    n_rare = max(0, (room // per_word - n_common * common_freq) // rare_freq)
    for _ in range(8):  # the numbering's tokens grow with the count: shrink until the list fits
        words = common * common_freq + rare[:n_rare] * rare_freq
        random.Random(f"{name}-{length}-{seed}-order").shuffle(words)
        used = len(tok.encode(" ".join(f"{i + 1}. {w}" for i, w in enumerate(words))))
        if used <= room or n_rare == 0:
            break
        n_rare = max(0, int(n_rare * room / used) - 1)
    body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    return Sample(name, f"{head}{body}\n{question}", prefix, tuple(common), length, float("nan"), max_new=8 * n_common,
                  seed=seed)


def make_fwe(tok, length, depth, seed, *, name="fwe", alpha=2.0) -> Sample:
    """Frequent words extraction: coded text of nonsense words drawn from a Zipf law (alpha 2); asked
    for the three most frequent (depth unused)."""
    rng = random.Random(f"{name}-{length}-{seed}")
    vocab = sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 6))) for _ in range(1000)})
    rng.shuffle(vocab)
    weights = [1 / (r + 1) ** alpha for r in range(len(vocab))]
    question = "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?"
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    head = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. "
    room = length - len(tok.encode(head + question)) - overhead(tok, prefix)
    words, used = [], 0
    while True:
        w = rng.choices(vocab, weights)[0]
        used += len(tok.encode(" .... " + w))
        if used > room:
            break
        words.append(w)
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))[:3]
    body = " .... ".join(words)
    return Sample(name, f"{head}{body}\n{question}", prefix, tuple(top), length, float("nan"), max_new=24, seed=seed)


def _niah(**kw):
    return lambda tok, length, depth, seed, haystack="varied", name="": make_niah(tok, length, depth, seed,
                                                                                   haystack=haystack, name=name, **kw)


# name -> generator(tok, length, depth, seed, haystack, name); each task once in this table
SUITE = {
    "niah_number": _niah(kind="number"),
    "niah_word": _niah(kind="word"),
    "niah_uuid": _niah(kind="uuid"),
    "niah_multikey": _niah(kind="number", n_keys=4),
    "niah_multivalue": _niah(kind="number", n_values=4),
    "niah_multiquery": _niah(kind="number", n_keys=4, n_queries=4),
    "vt": lambda tok, length, depth, seed, haystack="varied", name="": make_vt(tok, length, depth, seed,
                                                                               haystack=haystack, name=name),
    "cwe": lambda tok, length, depth, seed, haystack="", name="": make_cwe(tok, length, depth, seed, name=name),
    "fwe": lambda tok, length, depth, seed, haystack="", name="": make_fwe(tok, length, depth, seed, name=name),
}
NO_HAYSTACK = ("cwe", "fwe")  # the list is the context: neither haystack nor depth applies


def build(tok, tasks, lengths, depths, seeds: int) -> list[Sample]:
    """`seeds` samples per (task, length), seed-major (a run cut short has every task and length at
    about the same count). Sample s of a task puts its fact at depths[(s + task's index) % n] and
    alternates the two haystacks, so depths and haystacks spread over the samples."""
    out = []
    for s in range(seeds):
        for n in lengths:
            for i, name in enumerate(tasks):
                d = 0.5 if name in NO_HAYSTACK else depths[(s + i) % len(depths)]
                out.append(SUITE[name](tok, n, d, s, haystack=("varied", "noise")[s % 2], name=name))
    return out
