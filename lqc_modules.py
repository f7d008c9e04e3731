"""lqc's other files from anywhere, once lqc is pip-installed: `from lqc_modules import checkpoint,
decoding`; and the console scripts lqc-generate, lqc-eval, lqc-bench, lqc-serve.

In the clone, cli.py, model.py, tokenizer.py, checkpoint.py, decoding.py, generate.py, eval.py and bench.py import one
another by bare names (`import model`): that keeps the repo flat and `python generate.py` working.
Installed, those generic names must not become top-level modules in site-packages, or a user's
own model.py or eval.py would be shadowed by ours (or ours by theirs). So a wheel ships the files
in the private folder `_lqc/`, an editable install leaves them in the clone, and only the
distinctive names lqc, lqc_hf and lqc_modules are importable. This module loads the files under
the names `_lqc.<name>`; only while they import does `model` mean lqc's model.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

FLAT = ("cli", "model", "tokenizer", "checkpoint", "fetch", "gguf_file", "ruler", "sampling", "speculative", "steps",
        "cache_limit", "decoding", "generate", "eval", "bench", "serve")
HERE = Path(__file__).resolve().parent
FOLDER = HERE if (HERE / "generate.py").is_file() else HERE / "_lqc"  # the clone (or editable install) / a wheel


def __getattr__(name: str):  # `from lqc_modules import generate`
    if name not in FLAT:
        raise AttributeError(f"module 'lqc_modules' has no attribute {name!r}")
    return load(name)


def load(name: str):
    """lqc's `name`.py as a module: the one already imported by that bare name when it is ours (in
    the clone, where tests and scripts import `generate`), else a private copy `_lqc.<name>`."""
    private = sys.modules.get(f"_lqc.{name}")
    if private is not None:
        return private
    if _is_ours(name):
        return importlib.import_module(name)
    with _flat_names():
        importlib.import_module(name)
    return sys.modules[f"_lqc.{name}"]


def _is_ours(name: str) -> bool:
    """Whether `import name` here would give lqc's file (found without importing it)."""
    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # in sys.modules without a spec: not a file of ours
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve() == FOLDER / f"{name}.py"


@contextmanager
def _flat_names():
    """While lqc's files import one another, their bare names mean lqc's files: the folder comes
    first on sys.path and modules of the same names are set aside; afterwards ours move to
    `_lqc.<name>` and the set-aside ones come back."""
    aside = {n: sys.modules.pop(n) for n in FLAT if n in sys.modules}
    # files of ours loaded before keep serving under their bare names: one `cli`, one `model`, ...
    # whichever order a user reaches them in
    sys.modules.update({n: sys.modules[f"_lqc.{n}"] for n in FLAT if f"_lqc.{n}" in sys.modules})
    sys.path.insert(0, str(FOLDER))
    try:
        yield
    finally:
        sys.path.remove(str(FOLDER))
        for n in FLAT:
            if n in sys.modules:
                sys.modules[f"_lqc.{n}"] = sys.modules.pop(n)
        sys.modules.update(aside)


def _run_script(name: str):
    """Run lqc's `name`.py exactly as `python name.py` does. The console script's process runs no
    user code, so there its folder may come first on sys.path."""
    sys.path.insert(0, str(FOLDER))
    runpy.run_path(str(FOLDER / f"{name}.py"), run_name="__main__")


def generate_cli():
    _run_script("generate")


def eval_cli():
    _run_script("eval")


def bench_cli():
    _run_script("bench")


def serve_cli():
    _run_script("serve")
