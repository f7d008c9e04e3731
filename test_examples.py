"""examples/ and check_cuda.py run as written (with fewer tokens), so what the README points to cannot rot."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as E
from test_lqc import hf_tiny

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run_example(name: str, *args: str, monkeypatch) -> None:
    """Run examples/<name> as `python examples/<name> args...` does, in this process."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_doc_ends_with_a_question_it_answers():
    body, question = (EXAMPLES / "doc.txt").read_text().strip().rsplit("\n\nQuestion: ", 1)
    assert question == "Who keeps the lighthouse?" and "kept by a woman named Agnes Morrow" in body


def test_api_example_answers_from_the_document(monkeypatch, capsys):
    """LAQ++ keeping 64 of the ~530 prompt entries per head still finds the keeper (SmolLM2)."""
    run_example("api.py", "--max-new-tokens", "16", monkeypatch=monkeypatch)
    stats, answer = capsys.readouterr().out.strip().split("\n", 1)
    assert stats.startswith("[laqpp] prompt") and "KV kept 64/" in stats
    assert "Agnes Morrow" in answer


def test_kvpress_example_runs_on_a_tiny_transformers_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("kvpress")
    hf_tiny(tmp_path)
    (tmp_path / "hf-tiny" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML}))
    run_example("kvpress_example.py", "--model", str(tmp_path / "hf-tiny"), "--budget", "16", "--max-new-tokens", "3",
                monkeypatch=monkeypatch)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split(":")[0] for l in lines] == [
        "Q", "compress   full", "compress snapkv", "compress  laqpp", "pipeline, no press",
        "pipeline, SnapKVPress (keeps 16)", 'pipeline, LQCPress("laqpp", budget=16)']


def test_kvpress_example_skips_in_one_line_without_kvpress(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress now fails as if not installed
    with pytest.raises(SystemExit) as exit_:
        run_example("kvpress_example.py", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.count("\n") == 1 and "skipped, kvpress is not installed" in out


def test_data_jsonl_is_in_eval_format_with_answers_in_the_context():
    tasks = E.load_longbench(str(EXAMPLES / "data.jsonl"), None)
    assert len(tasks) == 3
    for t in tasks:
        assert "\n\nQuestion: " in t.context and any(a in t.context for a in t.answers)


def test_check_cuda_refuses_in_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run check_cuda.py itself")
    r = subprocess.run([sys.executable, str(ROOT / "check_cuda.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "no CUDA device" in r.stderr


def test_check_cuda_checks_pass_on_the_cpu(capsys):
    """The script's own logic, on the CPU (compile excepted: minutes on a CPU): one ok line per check."""
    pytest.importorskip("transformers")
    import check_cuda
    assert check_cuda.main("cpu", ["dense", "flex", "bf16", "lqc_hf"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split()[:2] for l in lines[1:]] == [["ok", "dense"], ["ok", "flex"], ["ok", "bf16"], ["ok", "lqc_hf"]]


@pytest.mark.parametrize("flags, message", [
    (["--budget", "0"], "--budget must be > 0"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--method", "bogus"], "invalid choice: 'bogus'"),
    (["--ckpt", "/nonexistent/model.gguf"], "not found"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "not available here")]))
def test_api_example_fails_the_way_the_cli_does(flags, message):
    """The examples are what users copy: bad input is one line and exit 2, as in generate.py."""
    r = subprocess.run([sys.executable, str(EXAMPLES / "api.py"), *flags], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
