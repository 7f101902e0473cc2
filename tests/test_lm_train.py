"""The causal LM through the shared trainer: every LM config runs, resume is exact, and the
trained model serves `m3ae lm-eval` and `m3ae generate`. Real Shakespeare shards, real GPT-2 BPE.
"""

from __future__ import annotations

import json
import math

import pytest

from m3ae.config import load_config
from m3ae.trainer.train import train

LM_ARGS = ["tiny", "small", "base", "small,nofcm", "small,tfcm", "small,pair"]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """`m3ae shards --source shakespeare` output: train/ and heldout/ shards split by play."""
    from pipelines.text_shards import write_shakespeare_shards

    out = tmp_path_factory.mktemp("shakespeare")
    write_shakespeare_shards(out)
    return out


def shrunk(shakespeare, steps: int = 2, *extra: str) -> list[str]:
    """Overrides that keep a recipe but run its model at the tiny size on short rows."""
    return [
        "model_size=tiny",
        f"data.urls={shakespeare / 'train'}",
        f"data.val_urls={shakespeare / 'heldout'}",
        "data.seq_len=32",
        "optim.batch_size=4",
        f"optim.steps={steps}",
        "optim.warmup_steps=1",
        "logging.every=1",
        "logging.peak_flops=1e9",
        "logging.tensorboard=False",
        "eval.batches=1",
        *extra,
    ]


@pytest.mark.parametrize("arg", LM_ARGS)
def test_lm_config_has_a_pulse(arg, shakespeare, tmp_path):
    """Two training steps of every LM recipe (shrunk), ending in a loadable model."""
    from lm.pretrained import load_lm

    config = load_config(f"lm_fcm:{arg}", shrunk(shakespeare))
    assert config.task == "lm"
    summary = train(config, str(tmp_path))
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    assert summary["last_loss"] > 5  # ~ln(50257) = 10.8 at init; 2 steps cannot get far
    model, _ = load_lm(tmp_path / "model")
    assert model.fcm_eta == (0.0 if "nofcm" in arg else 0.15)
    assert model.tfcm == ("tfcm" in arg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("lm_val/perplexity" in r.get("eval", {}) for r in rows)
    if "tfcm" in arg:
        assert any("text/tfcm_loss" in r for r in rows)


def test_lm_resume_is_exact(shakespeare, tmp_path):
    """Stopping after 2 steps and rerunning gives the same losses as 4 steps straight through:
    the text iterator's state (mid-document carry-over included) travels with the checkpoint."""

    def losses(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    extra = ("checkpoint.every=1", "checkpoint.async_save=False", "eval.every=0")
    straight = load_config("lm_fcm:tiny", shrunk(shakespeare, 4, *extra))
    train(straight, str(tmp_path / "straight"))
    resumed = load_config("lm_fcm:tiny", shrunk(shakespeare, 4, *extra))
    train(resumed, str(tmp_path / "resumed"), stop_after=2)
    train(resumed, str(tmp_path / "resumed"))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_lm_eval_and_generate_commands(shakespeare, tmp_path, capsys):
    from m3ae.cli import main

    train(load_config("lm_fcm:tiny", shrunk(shakespeare, 3)), str(tmp_path / "run"))
    model = str(tmp_path / "run" / "model")
    out = tmp_path / "ppl.json"
    args = ["lm-eval", "--model", model, "--data", str(shakespeare / "heldout")]
    assert main([*args, "--max-batches", "2", "--batch-size", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["seq_len"] == 32 and result["tokens"] > 0 and result["step"] == 3
    assert 100 < result["perplexity"] < 60_000  # a barely trained model over 50,257 tokens

    capsys.readouterr()
    assert main(["generate", "--model", model, "--prompt", "ROMEO.", "--max-new-tokens", "5",
                 "--greedy"]) == 0  # fmt: skip
    greedy = capsys.readouterr().out
    assert greedy.startswith("ROMEO.")
    assert main(["generate", "--model", model, "--prompt", "ROMEO.", "--max-new-tokens", "5",
                 "--greedy"]) == 0  # fmt: skip
    assert capsys.readouterr().out == greedy  # greedy decoding is deterministic
    assert main(["generate", "--model", model, "--max-new-tokens", "5", "--top-k", "0"]) == 2
    assert main(["lm-eval", "--model", str(tmp_path), "--data", str(shakespeare)]) == 2
