"""What the command lines (generate.py, eval.py, bench.py, serve.py) share: one-line errors and
honest exit codes, the prompt read as strict UTF-8, flags and the device checked before any model
work, the window rule, and outputs written so that an interrupted run loses nothing.

Exit codes: 0 done; 2 bad input (one line on stderr naming the flag or file); 1 an output could not
be written (one line: disk full, closed stdout); 130 Ctrl-C; 141 stdout closed early by the reader
(`| head`), quietly, as for any Unix tool killed by SIGPIPE. Anything else comes with a traceback:
that is a bug in lqc. No torch here, so `quiet_ctrl_c` can be installed before torch imports.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

MAX_PROMPT_BYTES = 64 * 2**20  # more than any model's context holds; stops `--prompt-file /dev/zero`
MIN_TEMPERATURE = 1e-6  # below this (denormals included) logits / temperature overflows; 0 means greedy
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed accepts
CONFIG_FLAGS = {"budget": "--budget", "window": "--window", "window_laqpp": "--window-laqpp",
                "lookahead": "--lookahead", "kernel": "--pool-kernel", "pool": "--pool"}  # lqc.EvictConfig field -> flag
WINDOW_RULE = ("A window is part of the budget: --window or --window-laqpp above --budget is clamped to the budget "
               "(a note on stderr says so), and a --budget at least the prompt's length evicts nothing (a note too).")


class BadInput(ValueError):
    """Something the user typed or pointed lqc at cannot be used; the message says what to fix."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what to fix. Here, torch-free, so that the
    exit wrapper catches it in any process (an example script reaching lqc's files by private names)."""


class CannotWrite(Exception):
    """An output could not be written (disk full, stdout closed); not the user's input, not a bug."""


class DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, a flag that is
    off) or the help text already says it."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == "" or d is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)  # as one would type it
        return f"{action.help or ''} (default: {shown.replace('%', '%%')})"


class ArgParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=kwargs.pop("formatter_class", DefaultsFormatter), **kwargs)

    def error(self, message):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def note(prog: str, message: str):
    """A one-line remark on stderr about what lqc did with a value it was given."""
    print(f"{prog}: note: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Running a main: exit codes

def quiet_ctrl_c():
    """Ctrl-C exits 130 without a traceback at any moment, also while torch imports (before any
    try block of ours runs). Raising SystemExit still runs `finally` blocks (temporary files)."""
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))


def exit_on_bad_input(prog: str, fn, *args, **kwargs):
    """Run a CLI's main with the exit codes above. A run that fails leaves no empty --out folder
    that it created (`start_out`)."""
    _CREATED.clear()  # this run's folders only (tests run several mains in one process)
    try:
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            remove_empty_outputs()
            raise
        flush_stdout()  # a closed or full stdout shows here, not in the interpreter's exit
        return result
    except (BadInput, CheckpointError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CannotWrite as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader has gone (`| head`): nothing left to say
        _drop_stdout()
        sys.exit(141)
    except KeyboardInterrupt:
        sys.exit(130)


def _drop_stdout():
    # point stdout at /dev/null, so the interpreter's final flush cannot fail a second time
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def write_stdout(text: str):
    """Write and flush; a stdout that cannot take it is one line (CannotWrite), a reader that went
    away is BrokenPipeError (a quiet exit)."""
    if sys.stdout is None:
        raise CannotWrite("cannot write to stdout: it is closed")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _drop_stdout()
        raise CannotWrite(f"cannot write to stdout: {e.strerror or e}") from None


def flush_stdout():
    if sys.stdout is not None:
        write_stdout("")


# ----------------------------------------------------------------------------------------------
# Reading text: strict UTF-8, byte positions in errors

def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} is not UTF-8: byte 0x{data[e.start]:02x} at byte position {e.start}") from None


def check_utf8(text: str, flag: str) -> str:
    """A command-line argument is decoded with surrogateescape: a lone surrogate is an undecodable byte."""
    bad = next((i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        decode_utf8(text.encode("utf-8", "surrogateescape"), flag)
    return text


def read_file_text(path: str, flag: str) -> str:
    """A file's text, refusing what cannot be a prompt or a data file: unreadable, not UTF-8, huge."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise BadInput(f"cannot read {flag}: {e.strerror}: {path}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise BadInput(f"{flag} {path} is larger than {MAX_PROMPT_BYTES >> 20} MiB: more than any model's context")
    return decode_utf8(data, f"{flag} {path}")


def read_stdin_text() -> str:
    if sys.stdin is None:  # started with `<&-`
        raise BadInput("stdin is closed: give --prompt, --prompt-file or --demo")
    try:
        data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise BadInput(f"cannot read stdin: {e.strerror}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise BadInput(f"stdin is larger than {MAX_PROMPT_BYTES >> 20} MiB: more than any model's context")
    return decode_utf8(data, "stdin")


# ----------------------------------------------------------------------------------------------
# Flags: checked before any model work, each error naming its flag

def positive(flag: str, *values):
    """Each value > 0; None is a flag left at its default ("automatic")."""
    for v in values:
        if v is not None and not v > 0:  # NaN too
            raise BadInput(f"{flag} must be > 0 (got {v})")


def at_least(flag: str, value, low):
    if not value >= low:
        raise BadInput(f"{flag} must be >= {low} (got {value})")


def distinct(flag: str, values):
    if len(set(values)) != len(values):
        raise BadInput(f"{flag} lists a value twice: {' '.join(map(str, values))}")


def check_sampling(temperature: float, top_k: int, top_p: float, seed: int | None):
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise BadInput(f"--temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g} (got {temperature})")
    at_least("--top-k", top_k, 0)
    if not 0 < top_p <= 1:
        raise BadInput(f"--top-p must be in (0, 1] (got {top_p})")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise BadInput(f"--seed must be between -2**63 and 2**64-1 (got {seed})")


def check_device(device: str, dtype: str):
    """The torch device and dtype of --device and --dtype, or one line saying what is missing."""
    import torch  # as in evict_config: every caller has imported it by now

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BadInput(f"device {device!r} cannot run lqc: use cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} is not available here (no CUDA): use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"device {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput("device 'mps' is not available here: use --device cpu")
    return dev, getattr(torch, dtype)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def evict_config(*, method: str, budget: int, window: int = 32, window_laqpp: int = 8, lookahead: int = 8,
                 kernel: int = 7, pool: str = "max", notes: list | None = None, cache_limit: int | None = None):
    """lqc.EvictConfig from flags (its ranges are checked there, and named here by their flags),
    with the window rule: a window is part of the budget, so a window larger than the budget is
    clamped to it, and `notes` gets a line saying so (printed once all input is checked, so that bad
    input still ends with exactly one line). Every kept entry is then a recent one, which is what
    lqc keeps anyway when the window covers the budget. A --cache-limit below the budget is what
    the prompt keeps: the windows are clamped to it, and the note names it."""
    import dataclasses
    import lqc  # torch: every caller has imported it by now; cli.py itself stays torch-free (quiet_ctrl_c)
    positive("--cache-limit", cache_limit)  # the windows are clamped to it
    windows = dict(window=window, window_laqpp=window_laqpp)
    try:
        cfg = lqc.EvictConfig(method=method, budget=budget, lookahead=lookahead, kernel=kernel, pool=pool, **windows)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise BadInput(CONFIG_FLAGS.get(field, field) + str(e)[len(field):]) from None
    kept, flag = (budget, "--budget") if cache_limit is None or cache_limit >= budget else (cache_limit, "--cache-limit")
    clamped = [name for name in (cfg.entry.windows if cfg.entry else ()) if windows[name] > kept]
    if clamped and notes is not None:
        what = (f"{method}'s lookahead runs on a copy of the cache holding only the {kept} most recent prompt entries"
                if clamped == ["window"] and cfg.looks_ahead else
                f"{method} keeps only the {kept} most recent prompt entries")
        notes.append(" and ".join(f"{flag_name(n)} {windows[n]}" for n in clamped)
                     + f" > {flag} {kept}: clamped to {kept}; {what}")
    return dataclasses.replace(cfg, **{name: kept for name in clamped})


def check_grid(methods: list[str], budgets: list[int], notes: list, **flags):
    """eval / bench: every method x budget is a valid config; one note for all clamped windows."""
    clamped = []
    for m in methods:
        for b in budgets:
            evict_config(method=m, budget=b, notes=clamped, **flags)
    if clamped:
        notes.append(clamped[0] + (f" (and {len(clamped) - 1} more method x budget pairs)" if len(clamped) > 1 else ""))


def budget_note(method: str, budget: int, prompt_tokens: int, notes: list, cache_limit: int | None = None,
                max_new_tokens: int = 0):
    """A budget that covers the whole prompt evicts nothing: say so, since the user asked for eviction.
    Under a cache limit the prompt keeps min(budget, limit), and decoding evicts once the cache
    (prompt + the answer's tokens fed so far) would pass the limit."""
    if method == "full":
        return
    if cache_limit is None or cache_limit >= budget:
        if budget < prompt_tokens:
            return
        what = f"--budget {budget} >= the prompt's {prompt_tokens} tokens"
    elif cache_limit < prompt_tokens:
        return  # the prompt is evicted to the limit; the summary's "KV kept" says so
    else:
        what = f"--cache-limit {cache_limit} (below --budget {budget}) >= the prompt's {prompt_tokens} tokens"
    if cache_limit is not None and prompt_tokens + max_new_tokens - 1 > cache_limit:
        notes.append(f"{what}: the prompt is kept whole; decoding evicts once the cache holds {cache_limit} entries")
    else:
        notes.append(f"{what}: nothing is evicted")


def budgets_note(budgets: list[int], lengths: list[int], notes: list):
    """eval / bench: the same, once, for the first budget that covers a prompt length."""
    b, n = next(((b, n) for b in sorted(budgets) for n in sorted(lengths) if b >= n), (None, None))
    if b is not None:
        notes.append(f"--budgets {b} >= --lengths {n}: nothing is evicted at that length")


# ----------------------------------------------------------------------------------------------
# Outputs: an occupied folder is refused, every file is replaced whole

def check_out(out: str, overwrite: bool) -> Path:
    """--out before any work: a new or empty folder, or (--overwrite) one with an earlier run in it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise BadInput(f"--out {out} is not empty: choose another folder or pass --overwrite")
    nearest = next(p for p in [path, *path.parents] if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to --out {out}: {nearest} is not a writable folder")
    return path


_CREATED: list[Path] = []  # --out folders this process created (removed again if a failed run left them empty)


def remove_empty_outputs():
    for path in _CREATED:
        try:
            path.rmdir()  # only an empty folder
        except OSError:
            pass


def start_out(path: Path, outputs: list[str]):
    """Just before the first result is written: create the folder and remove an earlier run's
    outputs, so new results never sit beside old figures."""
    if not path.exists():
        _CREATED.append(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in outputs:
            (path / name).unlink(missing_ok=True)
    except OSError as e:
        raise CannotWrite(f"cannot write to {path}: {e.strerror}") from None


def write_atomic(path: Path, write):
    """`write(tmp_path)` into a temporary file beside path, then rename it over path: a reader sees
    the old file or the new one, never half of one. A failure (disk full) is one line."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells matplotlib the format
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise CannotWrite(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def finite_or_none(obj):
    """NaN and infinities (e.g. a depth that does not apply) become null: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, obj):
    text = json.dumps(finite_or_none(obj), indent=1, allow_nan=False)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def write_text(path: Path, text: str):
    write_atomic(path, lambda tmp: tmp.write_text(text))


def append_line(path: Path, obj):
    """One JSON line, written with one call and flushed to disk: a kill leaves whole lines (and at
    most a cut last one, which `whole_lines` drops)."""
    data = (json.dumps(finite_or_none(obj), allow_nan=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise CannotWrite(f"cannot write {path}: {e.strerror or e}") from None


def whole_lines(path: Path) -> list[str]:
    """The whole lines of a JSONL file that `append_line` writes; a last line cut short by a kill is
    dropped and the file is cut back to its last whole line, so the next append starts clean."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    whole = raw[: raw.rfind(b"\n") + 1]
    if len(whole) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return whole.decode("utf-8", errors="replace").splitlines()
