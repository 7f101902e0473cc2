"""One command-line grammar: every verb's help runs, shares the common flags and shows defaults;
`--version`; recipes listed, and a config file without one is an error naming them."""

from __future__ import annotations

import argparse
import importlib.metadata
import re

import pytest

from m3ae.cli import build_parser, main

# Verbs by what they take: a model directory, input data, and where their output goes.
READS_MODEL = {"finetune", "crossmodal", "zeroshot", "embed", "lm-eval", "generate", "probe",
               "serve", "export"}  # fmt: skip
READS_DATA = {"finetune", "crossmodal", "zeroshot", "embed", "lm-eval", "probe", "vocab"}
WRITES_WORKDIR = {"train", "finetune", "launch"}
WRITES_OUT = {"crossmodal", "zeroshot", "shards", "embed", "lm-eval", "probe", "vocab", "export",
              "plot", "import-reference"}  # fmt: skip
# Old names kept as aliases of the common flag.
ALIASES = {"embed": "--inputs", "probe": "--dataset", "finetune": "--dataset", "vocab": "--shards"}


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def entry(text: str, flag: str) -> str:
    """The help lines of the option `flag`: its line and the more-indented ones after it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s+{re.escape(flag)}\b", line))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 6):  # the next option starts at 2 spaces
            break
        block.append(line)
    return " ".join(block)


def test_every_verb_is_classified():
    """A new verb has to say here what it reads and writes (and so get the common flags)."""
    known = READS_MODEL | READS_DATA | WRITES_WORKDIR | WRITES_OUT
    assert set(verbs()) - known <= {"install-data"}, sorted(set(verbs()) - known)


@pytest.mark.parametrize("verb", sorted(verbs()))
def test_help_runs_and_shares_the_common_flags(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: m3ae {verb}")
    flags = options(verbs()[verb])
    for group, flag in [(READS_MODEL, "--model"), (READS_DATA, "--data"),
                        (WRITES_WORKDIR, "--workdir"), (WRITES_OUT, "--out")]:  # fmt: skip
        if verb in group:
            assert flag in flags, f"m3ae {verb} lacks {flag}"
            assert flag in text
    if verb in ALIASES:
        assert ALIASES[verb] in flags  # the old name still parses
    # Every option with a default worth stating says it.
    for action in verbs()[verb]._actions:
        default = action.default
        if not action.option_strings or default is None or isinstance(default, bool):
            continue
        if default in ([], "", argparse.SUPPRESS):
            continue
        flag = action.option_strings[0]
        assert "default: " in entry(text, flag), (
            f"m3ae {verb} {flag}: default {default!r} not shown"
        )


def test_old_flag_names_parse_to_the_same_option():
    parse = build_parser().parse_args
    assert parse(["embed", "--model", "m", "--inputs", "x", "--out", "o"]).inputs == "x"
    assert parse(["embed", "--model", "m", "--data", "x", "--out", "o"]).inputs == "x"
    assert parse(["probe", "--dataset", "mnist", "--out", "o"]).dataset == "mnist"
    assert parse(["vocab", "--shards", "s", "--out", "o"]).shards == "s"
    assert parse(["finetune", "--dataset", "mnist", "--workdir", "w"]).dataset == "mnist"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"m3ae {importlib.metadata.version('m3ae')}"


def test_recipes_are_listed_and_required(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "m3ae_pretrain: local, cpu, tiny, mini, small, base, large, huge" in text
    assert "lm_fcm: tiny, small, base" in text
    for spec in ("configs/m3ae_pretrain.py", "m3ae_pretrain", "m3ae_pretrain:"):
        assert main(["train", "--config", spec, "--workdir", "w"]) == 2
        err = capsys.readouterr().err
        assert "name a recipe" in err and "local, cpu, tiny" in err, err
    assert main(["train", "--config", "m3ae_pretrian:local", "--workdir", "w"]) == 2
    assert "shipped: lm_fcm, m3ae_finetune, m3ae_pretrain" in capsys.readouterr().err


def test_declared_recipes_are_the_ones_the_files_accept():
    """RECIPES is read without running the file: it must agree with get_config."""
    from m3ae.config import config_files, load_config, recipes

    for path in config_files():
        for recipe in recipes(path):
            config = load_config(f"{path.stem}:{recipe}")
            assert config.task
        with pytest.raises(ValueError):
            load_config(f"{path.stem}:no-such-recipe")


def test_import_reference_takes_out_or_dst(capsys):
    assert main(["import-reference", "x.npz"]) == 2
    assert "DST or --out DST" in capsys.readouterr().err
    assert main(["import-reference", "x.npz", "a", "--out", "b"]) == 2
