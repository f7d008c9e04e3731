"""`pip install -e .` and `pip install .` into fresh virtualenvs, offline: lqc, lqc_hf and the three
console scripts work from any folder, and the generic names (model, eval, ...) stay the user's."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import lqc_modules
from test_lqc import save_hf_dir, tiny

ROOT = Path(__file__).resolve().parent
SCRIPTS = ("lqc-generate", "lqc-eval", "lqc-bench", "lqc-serve")

# From a user's folder holding its own model.py and eval.py: ours must neither shadow nor use them.
USER_CHECK = """
import lqc, lqc_hf, model, eval
from lqc_modules import decoding, generate, checkpoint, steps
assert model.WHO == "user" and eval.WHO == "user", "lqc shadowed a user's module"
assert steps.M is not model and hasattr(steps.M, "Transformer"), "lqc picked up the user's model.py"
assert lqc_hf.D is decoding and generate.run is decoding.run
print("ok", generate.__file__)
"""


def can_build() -> str | None:
    """Why an offline build cannot run here, or None."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    if int(setuptools.__version__.split(".")[0]) < 77:
        return f"setuptools {setuptools.__version__} < 77 (pyproject's license field)"
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    if pip.returncode != 0 or tuple(map(int, pip.stdout.split()[1].split(".")[:2])) < (22, 3):
        return "pip >= 22.3 is needed (pip --python)"
    return None


def fresh_venv(path: Path) -> Path:
    """A venv without pip whose site-packages see this interpreter's (torch, setuptools) after its
    own, through a .pth file: nothing is downloaded and the installed torch is reused, not replaced."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_lqc_test_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def run(cmd, cwd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the working tree, the wheel built from it): builds leave build/ and *.egg-info in
    the copy, not here."""
    why = can_build()
    if why:
        pytest.skip(f"cannot build offline: {why}")
    tmp = tmp_path_factory.mktemp("clone")
    clone = tmp / "lqc"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".venv", ".git", "out", "figures", "build", "*.egg-info",
                                                               "__pycache__", ".hypothesis", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-w", tmp, clone],
        cwd=tmp)
    return clone, next(tmp.glob("lqc-*.whl"))


def test_wheel_ships_only_the_flat_files(wheel):
    """lqc.py, lqc_hf.py, lqc_modules.py at the top, the generic files under _lqc/, nothing else (no
    tests, no examples), and the licence."""
    names = zipfile.ZipFile(wheel[1]).namelist()
    code = sorted(n for n in names if n.endswith(".py"))
    assert code == sorted(["lqc.py", "lqc_hf.py", "lqc_modules.py", *(f"_lqc/{n}.py" for n in lqc_modules.FLAT)])
    assert any(n.endswith("licenses/LICENSE") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert all(s in zipfile.ZipFile(wheel[1]).read(entry).decode() for s in SCRIPTS)


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "wheel"])
def test_pip_install_keeps_generic_names_free(wheel, tmp_path, editable):
    clone, whl = wheel
    py = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-index", "--no-deps",
         "--no-build-isolation", *(["-e", clone] if editable else [whl])], cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    found = run([py, "-c", f"import importlib.util as u; print([n for n in {lqc_modules.FLAT} if u.find_spec(n)])"],
                cwd=empty).stdout
    assert found.strip() == "[]", f"generic top-level modules after installing lqc: {found}"

    user = tmp_path / "user"
    user.mkdir()
    for name in ("model", "eval"):
        (user / f"{name}.py").write_text('WHO = "user"\n')
    out = run([py, "-c", USER_CHECK], cwd=user).stdout
    assert str(clone if editable else tmp_path / "venv") in out  # the clone's generate.py, or the wheel's private copy

    ckpt = save_hf_dir(tiny(), tmp_path / "tiny")
    gen = run([tmp_path / "venv" / "bin" / "lqc-generate", "--ckpt", ckpt, "--prompt", "the lighthouse keeper",
               "--method", "laq", "--budget", "8", "--window", "4", "--max-new-tokens", "3"], cwd=user)
    assert gen.stderr.startswith("[laq] prompt "), gen.stderr  # the summary line alone
    served = run([tmp_path / "venv" / "bin" / "lqc-serve", "--ckpt", ckpt, "--bench", "--kv-memory", "1KB"], cwd=user,
                 check=False)
    assert served.returncode == 2 and "holds no slot" in served.stderr, served.stderr  # serve.py, with its own checks
