"""Config files: Python files with `get_config(arg)`, loaded by path, with `key=value` overrides.

    config = load_config("configs/m3ae_pretrain.py:local", ["optim.base_lr=1e-3", "seed=1"])
    config = load_config("m3ae_pretrain:local")     # a shipped recipe by name, from anywhere

Shipped recipes live in `configs/`, installed as `m3ae/configs/` (a link in a checkout), so a
name works from a wheel away from any checkout. A file that declares `RECIPES` needs one of them
after the colon: a bare `m3ae_pretrain.py` is an error listing them, not a silent default.

Overrides are parsed as Python literals (falling back to a plain string) and must name an existing
key: a typo is an error that names the key and the closest valid ones, never a silent no-op.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_DIR = Path(__file__).parent / "configs"  # -> ../configs in a checkout


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """`"path/to/file.py:arg"` or a bare name in `configs/` (`"m3ae_pretrain:local"`)."""
    path, sep, arg = spec.partition(":")
    candidate = Path(path)
    if not candidate.suffix:
        candidate = CONFIG_DIR / f"{path}.py"
    if not candidate.is_file():
        names = ", ".join(p.stem for p in config_files())
        raise FileNotFoundError(
            f"config file {candidate} does not exist (from {spec!r}); shipped: {names}"
        )
    choices = recipes(candidate)
    if choices and not (sep and arg):
        raise ValueError(
            f"--config {spec}: name a recipe, {candidate.stem}:RECIPE with RECIPE one of "
            f"{', '.join(choices)}"
        )
    return candidate, (arg if sep else None)


def recipes(path: str | Path) -> tuple[str, ...]:
    """The `RECIPES` a config file declares (a literal tuple, read without running the file);
    empty when it declares none."""
    tree = ast.parse(Path(path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "RECIPES" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    return ()


def describe_recipes() -> str:
    """One line per shipped config file: `name: recipe, recipe, ...` (for `--help`)."""
    return "; ".join(f"{p.stem}: {', '.join(recipes(p)) or '-'}" for p in config_files())


def load_config(spec: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """Import the config file, call `get_config(arg)` and apply `key=value` overrides."""
    path, arg = resolve_config_path(spec)
    module_spec = importlib.util.spec_from_file_location(f"_m3ae_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} has no get_config(arg) function")
    config = module.get_config(arg) if arg is not None else module.get_config()
    for item in overrides or []:
        apply_override(config, item)
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Set `a.b.c=value` in place; unknown keys raise a KeyError naming the key."""
    key, sep, raw = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key=value")
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "<top>"
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"unknown config key {key!r} ({part!r} not in {where}){hint}")
        if depth < len(parts) - 1:
            node = node[part]
    value = _parse_value(raw)
    old = node[parts[-1]]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ValueError(f"config key {key!r} is a bool; got {raw!r}")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[parts[-1]] = value
    except TypeError as e:  # ConfigDict keeps a key's type: say which one, in config words
        raise ValueError(
            f"config key {key!r} takes a {type(old).__name__} (now {old!r}); got {raw!r}"
        ) from e


def config_files() -> list[Path]:
    """Every shipped config file."""
    return sorted(p for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")
