"""What a user sees besides the answer: the progress line on a terminal, --help with defaults,
figures that explain themselves, markdown that renders."""
from __future__ import annotations

import io
import sys

import pytest

import generate as G
from test_lqc import TEXT, save_hf_dir, tiny


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_hf_dir(tiny(), tmp_path_factory.mktemp("ux") / "tiny"))


def generate_main(monkeypatch, args: list[str], stderr: io.StringIO) -> tuple[str, str]:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", stderr)
    G.main(**vars(G.parse_args(args)))
    return out.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("extra", [[], ["--prefill-chunk", "16"], ["--compile"]], ids=["one-pass", "chunked", "compile"])
def test_progress_line_on_a_terminal_only(tiny_dir, monkeypatch, extra):
    args = ["--ckpt", tiny_dir, "--prompt", TEXT[:300], "--method", "snapkv", "--budget", "24", "--window", "8",
            "--max-new-tokens", "4", "--answer-prefix", "Answer:", *extra]
    if "--compile" in extra:  # the CLI's side of --compile, without minutes of compiling on a CPU
        monkeypatch.setattr(G, "make_step", lambda model, compile: G.model_step(model))
    plain_out, plain_err = generate_main(monkeypatch, args, io.StringIO())
    tty_out, tty_err = generate_main(monkeypatch, args, Terminal())
    assert tty_out == plain_out and plain_out.startswith("Answer:")  # stdout is the same either way
    assert "\r" not in plain_err  # nothing but the summary when stderr is a file or a pipe
    status = [s for s in tty_err.split("\r") if s]
    n = int(status[0].split("/")[1].split()[0])  # "prefill 16/57 tokens, layer 1/2"
    chunks = range(16, n, 16) if extra[:1] == ["--prefill-chunk"] else []
    fed = [*chunks, n]
    assert status[:2 * len(fed)] == [f"prefill {t}/{n} tokens, layer {i}/2\033[K" for t in fed for i in (1, 2)]
    assert status[2 * len(fed)].startswith("prefill done; ")
    if extra == ["--compile"]:
        assert status[2 * len(fed) + 1].startswith("compiling the decode step")
    assert status[-1].startswith("\033[K[snapkv] prompt")  # the line cleared before the summary
