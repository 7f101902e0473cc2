"""What the optional `tf` extra costs: install time, disk and import time, on top of the core.

    .venv/bin/python benchmarks/tf_extra_install.py --out benchmarks/results/tf_extra_install.json

In a fresh virtual environment (a temporary directory, removed afterwards) made with this
interpreter: `pip install <checkout>` (the core, timed as the reference), then
`pip install '<checkout>[tf]'` (the extra, timed: what a user who adds it runs). After each step
the environment's site-packages is measured on disk (every file, `du`-style apparent sizes) and
the packages the extra added are listed with their sizes. Import times are taken in fresh
interpreters: `import m3ae.cli` (what every verb pays), `import tensorflow`,
`import tensorflow_datasets`. Wheels come from whatever index and cache pip is configured with
(here a local mirror and pip's cache), so the times are install times, not downloads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def distributions(venv: Path) -> dict[str, dict[str, Any]]:
    """name -> version and installed bytes (from each distribution's RECORD)."""
    out = {}
    for dist in metadata.distributions(path=[str(site_packages(venv))]):
        size = sum(int(f.size or 0) for f in dist.files or ())
        out[dist.metadata["Name"].lower()] = {"version": dist.version, "bytes": size}
    return out


def timed(cmd: list[str], **kwargs: Any) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, **kwargs)
    return time.perf_counter() - start


def import_seconds(python: Path, module: str, repeats: int = 3) -> float:
    """Median wall time of `python -c 'import module'` in fresh interpreters."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    times = []
    for _ in range(repeats):
        times.append(timed([str(python), "-c", f"import {module}"], env=env, capture_output=True))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/tf_extra_install.json")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="m3ae-tf-extra-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        print("core: pip install .", flush=True)
        core_s = timed([*pip, str(ROOT)])
        core_bytes, core_dists = tree_bytes(site_packages(venv)), distributions(venv)
        print(f"core: {core_s:.1f} s, {core_bytes / 2**20:.0f} MiB; extra: pip install .[tf]")
        extra_s = timed([*pip, f"{ROOT}[tf]"])
        all_bytes, all_dists = tree_bytes(site_packages(venv)), distributions(venv)
        added = {
            name: info
            for name, info in all_dists.items()
            if name not in core_dists or core_dists[name]["version"] != info["version"]
        }
        imports = {
            module: round(import_seconds(python, module), 2)
            for module in ("m3ae.cli", "tensorflow", "tensorflow_datasets")
        }
    report = {
        "benchmark": "tf_extra_install",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "core": {"install_s": round(core_s, 1), "site_packages_mib": round(core_bytes / 2**20)},
        "tf_extra": {
            "install_s": round(extra_s, 1),
            "added_mib": round((all_bytes - core_bytes) / 2**20),
            "added_fraction_of_core": round((all_bytes - core_bytes) / core_bytes, 2),
            "packages": {
                name: {"version": info["version"], "mib": round(info["bytes"] / 2**20, 1)}
                for name, info in sorted(added.items(), key=lambda kv: -kv[1]["bytes"])
            },
        },
        "import_s": imports,
        "note": "wheels from the configured index and pip cache (a local mirror here): install "
        "times, not download times; sizes are installed bytes on disk",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    extra, core_mib = report["tf_extra"], report["core"]["site_packages_mib"]
    print(
        f"tf extra: {extra['install_s']} s to install, +{extra['added_mib']} MiB "
        f"({extra['added_fraction_of_core']:.0%} of the core's {core_mib} MiB), "
        f"{len(extra['packages'])} packages; imports {imports}; wrote {out}"
    )


if __name__ == "__main__":
    main()
