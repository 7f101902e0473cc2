"""The distribution as a user installs it: the built wheel in a fresh venv, away from the checkout.

The wheel owns exactly three top-level packages (m3ae, lm, pipelines; the recipes ship inside as
m3ae/configs), its metadata names every third-party package the code imports, and once
installed it trains two steps from a recipe *name* in a folder that is not the checkout.
"""

from __future__ import annotations

import ast
import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWNED = {"m3ae", "lm", "pipelines"}
# Imports that are not distributions on PyPI, or that come with another one.
PROVIDED = {"jax": "jax", "jaxlib": "jax", "google": "protobuf", "PIL": "pillow", "yaml": "pyyaml"}
LEFT_OUT = {".venv", ".git", "runs", "data", "build", "dist", "experiments", "benchmarks",
            "notebooks", "tests", "__pycache__", ".pytest_cache", ".ruff_cache", "w"}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline (no build isolation) from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        ROOT, src, symlinks=True, ignore=lambda d, names: [n for n in names if n in LEFT_OUT
                                                          or n.endswith(".egg-info")],
    )  # fmt: skip
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    done = subprocess.run(cmd + ["-w", str(tmp / "dist"), "-q"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp / "dist").glob("m3ae-*.whl")
    return path


def test_the_wheel_owns_three_packages_and_ships_the_recipes(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == OWNED, f"the wheel installs {sorted(top)} into site-packages"
    for recipe in ("m3ae_pretrain", "m3ae_finetune", "lm_fcm"):
        assert f"m3ae/configs/{recipe}.py" in names
    for module in ("m3ae/serve/app.py", "m3ae/export/timm_vit.py", "pipelines/data_packages.py"):
        assert module in names
    packages = {str(Path(n).parent) for n in names if n.endswith(".py")}
    source = {
        str(p.parent.relative_to(ROOT))
        for pkg in OWNED
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert source - packages == set(), "source folders missing from the wheel"


def third_party_imports() -> set[str]:
    """Top-level names the shipped code imports that are not ours or the standard library."""
    found = set()
    for pkg in OWNED:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - OWNED - set(sys.stdlib_module_names) - {"__future__", "configs"}


def test_metadata_requires_every_imported_distribution(wheel):
    """A missing install step shows here: each import resolves to a distribution that the
    wheel requires (core or an extra)."""
    import importlib.metadata as md

    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
    required = set()
    for req in meta.get_all("Requires-Dist"):
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        required.add(name.strip().lower().replace("_", "-"))
    dists = md.packages_distributions()
    unknown = []
    for module in sorted(third_party_imports()):
        # Not installed here (an optional extra such as wandb): the module's own name.
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        names |= {PROVIDED[module]} if module in PROVIDED else set()
        if not names & required:
            unknown.append(f"{module} (from {sorted(names) or 'no installed distribution'})")
    # The vocabulary/data packages are installed by `m3ae install-data`, never imported.
    assert not unknown, f"imported but not required by the wheel: {unknown}"


@pytest.mark.timeout(900)
def test_installed_wheel_trains_from_a_recipe_name_outside_the_checkout(
    wheel, clipart_shards, tmp_path
):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, m3ae = venv / "bin" / "python", venv / "bin" / "m3ae"
    # Dependencies: this environment's packages, on the path (no download); their .pth files
    # (our editable install's among them) are not run, so `m3ae` can only come from the wheel.
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    site = site.stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args], cwd=away, capture_output=True, text=True, env=env,
            timeout=timeout,
        )  # fmt: skip

    where = run(python, "-c", "import m3ae.config as c; print(c.__file__, c.CONFIG_DIR)")
    assert where.stdout.startswith(site), where.stdout + where.stderr
    helped = run(m3ae, "train", "--help")
    assert helped.returncode == 0 and "m3ae_pretrain: local, cpu, tiny" in helped.stdout
    bare = run(m3ae, "train", "--config", "m3ae_pretrain", "--workdir", "w")
    assert bare.returncode == 2 and "RECIPE one of local, cpu" in bare.stderr, bare.stderr
    overrides = [
        "model.patch_size=8", "data.paired.urls=" + "::".join(clipart_shards[1:]),
        f"data.val_urls={clipart_shards[0]}", "data.image_size=32", "data.text_length=16",
        "data.workers=1", "optim.batch_size=8", "optim.steps=2", "logging.every=1",
        "logging.peak_flops=1e9", "logging.tensorboard=False", "eval.batches=1",
    ]  # fmt: skip
    args = [m3ae, "train", "--config", "m3ae_pretrain:tiny", "--workdir", "run"]
    trained = run(*args, *[x for o in overrides for x in ("--set", o)], timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert '"steps": 2' in trained.stdout
    assert (away / "run" / "model" / "config.json").is_file()
