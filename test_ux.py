"""What a user sees besides the answer: the progress line on a terminal, --help with defaults,
figures that explain themselves, markdown that renders."""
from __future__ import annotations

import importlib
import io
import re
import sys

import pytest

import decoding as D
import generate as G
from steps import model_step
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
        monkeypatch.setattr(D, "make_step", lambda model, compile: model_step(model))
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


@pytest.mark.parametrize("script,flags", [
    ("generate", {"--budget": "256", "--method": "laqpp", "--device": "cpu", "--top-k": "0"}),
    ("eval", {"--budgets": "64 128 256", "--first-token": "redecode", "--pool-kernel": "7"}),
    ("bench", {"--lengths": "1024 2048 4096 8000", "--reps": "3", "--dtype": "float32"})])
def test_help_shows_defaults(script, flags, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in flags.items():
        assert re.search(rf"{flag} \S+.*?\(default: {default}\)", text), (flag, default)
    assert "(default: None)" not in text and "(default: False)" not in text


def test_bench_md_ends_its_table_before_the_ratio_lines(tiny_dir, tmp_path):
    """A line right under a markdown table renders as one more row: a blank line must come first."""
    import bench
    bench.main(bench.parse_args(["--ckpt", tiny_dir, "--lengths", "300", "--budgets", "256", "--reps", "1", "--steps",
                                 "2", "--warmup", "1", "--no-compile", "--e2e-tokens", "0", "--out", str(tmp_path / "b")]))
    lines = (tmp_path / "b" / "bench.md").read_text().splitlines()
    last_row = max(i for i, l in enumerate(lines) if l.startswith("|"))
    assert lines[last_row + 1] == "" and lines[last_row + 2].startswith("limit ratio")


def test_bench_end_to_end_runs_the_full_cache_once_for_all_budgets(tiny_dir, tmp_path, monkeypatch):
    """The full cache's end-to-end run does not depend on the budget: one measurement serves the
    verify rows of every budget; the evicting rows run once per budget."""
    import bench
    calls = []
    run = D.run
    monkeypatch.setattr(D, "run", lambda model, ids, cfg, **kw: calls.append((cfg.method, cfg.budget)) or run(model, ids, cfg, **kw))
    result = bench.main(bench.parse_args(["--ckpt", tiny_dir, "--lengths", "300", "--budgets", "64", "128", "--methods",
                                          "snapkv", "--reps", "2", "--steps", "2", "--warmup", "1", "--no-compile",
                                          "--e2e-tokens", "3", "--verify-draft-lens", "2", "--out", str(tmp_path / "b")]))
    assert sum(m == "full" for m, _ in calls) == 2  # once per repetition
    assert sorted(b for m, b in calls if m == "snapkv") == [64] * 4 + [128] * 4  # plain and verify, 2 reps each
    full = [r for r in result["end_to_end"] if r["run"] == "full"]
    assert [r["budget"] for r in full] == [64, 128] and full[0]["e2e_s"] == full[1]["e2e_s"]
    verify = [r for r in result["end_to_end"] if "verify" in r["run"]]
    assert len(verify) == 4 and all(r["ref"] == "full" and r["ratio"] > 0 for r in verify)


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures eval.py would save, kept for inspection instead of written."""
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    return figures


def fake_rows(methods, budgets, lengths=(512, 1024), depths=(0.25, 0.75)):
    return [dict(method=m, budget=b, length=n, depth=d, acc=float((n + b) % 3 == 0), recall=0.5)
            for m in methods for b in budgets for n in lengths for d in depths]


def test_accuracy_figure_tells_methods_apart_and_says_what_it_measured(saved_figures):
    import eval as E
    import lqc
    methods, budgets = list(lqc.method_names()), [32, 64]
    summary = E.summarize([dict(r, **{m: 0.0 for m in E.METRICS if m not in r}) for r in fake_rows(methods, budgets)])
    E.plot_accuracy(summary, methods, budgets, "smollm2, passkey: n = 4 prompts", "unused.png")
    fig = saved_figures[0]
    assert "smollm2" in fig._suptitle.get_text() and "n = 4" in fig._suptitle.get_text()
    curves = [l for l in fig.axes[0].get_lines() if l.get_label() != "full cache"]
    assert len({(l.get_marker(), l.get_linestyle(), l.get_color()) for l in curves}) == len(methods) - 1
    assert len({tuple(l.get_xdata()) for l in curves}) == len(curves)  # dodged: no two curves on the same x


def test_heatmap_has_values_and_a_colorbar(saved_figures):
    import eval as E
    methods = ["full", "snapkv", "laqpp"]
    E.plot_heatmaps(fake_rows(methods, [32]), methods, 32, "smollm2: n = 8 prompts", "unused.png")
    fig = saved_figures[0]
    assert len(fig.axes) == len(methods) + 1 and fig.axes[-1].get_label() == "<colorbar>"
    assert [len(ax.texts) for ax in fig.axes[:-1]] == [4] * len(methods)  # one value per length x depth cell
    assert "n = 8" in fig._suptitle.get_text()
