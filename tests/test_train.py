"""The training command has a pulse: a few steps on real openclipart shards."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from m3ae.config import load_config
from m3ae.pretrained import load_pretrained
from m3ae.trainer.train import train


def small_config(shards, *extra):
    overrides = [
        "data.paired.urls=" + "::".join(shards[1:]),
        f"data.val_urls={shards[0]}",
        "data.num_examples=32",
        "optim.batch_size=16",
        "optim.epochs=2",
        *extra,
    ]
    return load_config("m3ae_pretrain:local", overrides)


@pytest.fixture(scope="module")
def local_run(clipart_shards, tmp_path_factory):
    """The `local` recipe for 4 steps on the tar shards, logging every step: (summary, workdir)."""
    workdir = tmp_path_factory.mktemp("local-run")
    return train(small_config(clipart_shards, "logging.every=1"), str(workdir)), workdir


def step_losses(workdir) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["paired/text_loss"]) for r in rows if "loss" in r]


def test_train_local_recipe_runs(local_run):
    summary, workdir = local_run
    assert summary["steps"] == 4
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "loss" in r]
    evals = [r for r in map(json.loads, lines) if "eval" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert evals[-1]["step"] == 4 and np.isfinite(evals[-1]["eval"]["val_loss/loss"])
    keys = ("loss", "paired/image_loss", "paired/text_loss", "paired/text_accuracy", "grad_norm")
    for key in (*keys, "lr"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["lr"] < rows[1]["lr"]  # warm-up
    assert rows[-1]["data"]["paired"]["used"] >= 64
    assert (workdir / "reconstruction_000004.png").stat().st_size > 1000
    for key in ("samples_per_s", "tokens_per_s", "mfu", "data_wait_fraction", "nonfinite_steps"):
        assert all(np.isfinite(r[key]) for r in rows), key
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"reconstruction" in events[0].read_bytes()  # the image summary
    model, params = load_pretrained(workdir / "model")
    assert model.emb_dim == 128 and "block_0" in params["encoder"]
    # `data.tokenizer = "captions:2048"`: learnt from these shards, saved with the model.
    from pipelines.tokenizer import load_tokenizer

    vocab = (workdir / "tokenizer" / "vocab.txt").read_text().splitlines()
    assert vocab[0] == "[PAD]" and 100 < len(vocab) <= 2048 and model.vocab_size == len(vocab)
    assert len(load_tokenizer(workdir / "model" / "tokenizer")) == len(vocab)
    assert params["text_head"]["kernel"].shape == (64, len(vocab))


def test_tfrecord_shards_train_exactly_as_tars(local_run, tmp_path):
    """The same drawings as TFRecord files (written by `m3ae shards --container tfrecord`'s
    writer) train the very same steps: same batches, same vocabulary, same losses, bit for bit."""
    from pipelines.shard_records import openclipart_records
    from pipelines.shard_writer import write_shards

    records = openclipart_records(size=64, limit=96, shuffle_seed=0, workers=2)  # the tars'
    tfr = tmp_path / "tfrecord"
    write_shards(records, tfr, samples_per_shard=24, progress=False, container="tfrecord")
    tfrecords = sorted(str(p) for p in tfr.glob("*.tfrecord"))
    assert len(tfrecords) == 4
    train(small_config(tfrecords, "logging.every=1"), str(tmp_path / "tfr"))
    tars = local_run[1]
    assert len(step_losses(tars)) == 4
    assert step_losses(tmp_path / "tfr") == step_losses(tars)
    vocab = (tars / "tokenizer" / "vocab.txt").read_text()
    assert (tmp_path / "tfr" / "tokenizer" / "vocab.txt").read_text() == vocab


def test_train_with_unpaired_streams(clipart_shards, tmp_path):
    config = small_config(
        clipart_shards,
        "data.paired.weight=2.0",
        f"data.image_only.urls={clipart_shards[1]}",
        "data.image_only.weight=1.0",
        f"data.text_only.urls={clipart_shards[2]}",
        "data.text_only.weight=1.0",
        "optim.epochs=1",
        "logging.every=1",
    )
    summary = train(config, str(tmp_path))
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-2]
    assert summary["steps"] == 2
    assert {"paired/text_loss", "image_only/image_loss", "text_only/text_loss"} <= set(row)
    assert "image_only/text_loss" not in row and "text_only/image_loss" not in row


def test_train_cli_names_a_mistyped_key(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "m3ae.cli",
            "train",
            "--config",
            "m3ae_pretrain:local",
            "--workdir",
            str(tmp_path),
            "--config.optim.bsae_lr=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "bsae_lr" in res.stderr and "base_lr" in res.stderr


def test_accumulate_equals_the_full_batch_gradient():
    """Micro-batches (rows j, j+k, ...) averaged give exactly the full-batch loss and gradient."""
    import jax
    import jax.numpy as jnp

    from m3ae.trainer.step import accumulate

    x = jax.random.normal(jax.random.PRNGKey(0), (12, 5))
    w = {"w": jnp.arange(5.0)}

    def loss_fn(p, batch, key):
        err = (batch["x"] @ p["w"] - 1.0) ** 2  # (B,)
        return jnp.mean(err), {"max": jnp.max(err)}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(w, {"x": x}, None)
    micro = {"x": x.reshape(4, 3, 5).swapaxes(0, 1)}  # (3, 4, 5): 3 micro-batches of 4 rows
    (acc_loss, _), acc_grads = accumulate(grad_fn, w, micro, jax.random.PRNGKey(1), 3)
    np.testing.assert_allclose(acc_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(acc_grads["w"], grads["w"], rtol=1e-5)


def test_gradient_accumulation_trains(clipart_shards, tmp_path):
    """Two micro-batches of 8 per step: the same examples as one batch of 16; the masks are drawn
    per micro-batch, so the losses agree closely but not exactly."""
    rows = {}
    for accum in (1, 2):
        config = small_config(
            clipart_shards,
            f"optim.grad_accum_steps={accum}",
            "logging.every=1",
            "logging.tensorboard=False",
            "eval.hooks=()",
            "logging.pictures_every=0",
            "logging.peak_flops=1e9",
        )
        train(config, str(tmp_path / str(accum)))
        lines = (tmp_path / str(accum) / "metrics.jsonl").read_text().splitlines()
        rows[accum] = [r for r in map(json.loads, lines) if "loss" in r]
    assert len(rows[1]) == len(rows[2]) == 4
    for a, b in zip(rows[1], rows[2], strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-2)


def test_the_trainer_imports_no_model_family():
    """m3ae/trainer/ knows pipelines and the task protocol: a family module is imported by the
    name in `config.task`, never by an import statement (function-level ones included)."""
    import ast
    from pathlib import Path

    import m3ae.trainer

    families = ("m3ae.model", "m3ae.task", "m3ae.evaluate", "m3ae.flops", "m3ae.pretrained", "lm")
    for path in sorted(Path(m3ae.trainer.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(tuple(f + "." for f in families)), (path.name, name)
                assert name not in families, (path.name, name)


def test_a_task_is_found_by_its_family_name():
    from m3ae.trainer.task import make_task

    config = load_config("lm_fcm:tiny")
    task = make_task(config)  # lm/task.py's get_task
    assert task.name == "LM tiny (FCM)" and task.config is config
    assert set(task.hooks) == {"lm_val"} and task.describe is None
    for name, tried in (("nope", "no module nope.task"), ("pipelines", "pipelines.task")):
        with pytest.raises(ValueError, match="config.task") as error:
            make_task(ml_collections.ConfigDict({"task": name}))
        known = "known families: 'lm', 'm3ae', 'm3ae.finetune'"
        assert tried in str(error.value) and known in str(error.value)
    for bad in ("m3ae.trainer", "", "m3ae..x"):  # not families: no get_task, or not a name
        with pytest.raises(ValueError, match="known families"):
            make_task(ml_collections.ConfigDict({"task": bad}))
    with pytest.raises(ValueError, match="config.task is None"):
        make_task(ml_collections.ConfigDict({"task": None}))


def test_hooks_are_passed_by_the_task_not_registered():
    from m3ae.trainer.hooks import EvalContext, run_hooks

    config = ml_collections.ConfigDict({"eval": {"hooks": ("a", "b")}})
    ctx = EvalContext(config, None, None, None, 3, lambda arrays: arrays, {})
    hooks = {"a": lambda ctx: {"x": 1.0}, "b": lambda ctx: {"step": float(ctx.step)}}
    assert run_hooks(ctx, hooks) == {"a/x": 1.0, "b/step": 3.0}
    with pytest.raises(KeyError, match=r"'b'; known hooks: \['a'\]"):
        run_hooks(ctx, {"a": hooks["a"]})


def test_a_config_without_a_task_field_is_m3ae(clipart_shards):
    """Config files written before `config.task` existed keep training M3AE."""
    from m3ae.trainer.task import make_task

    urls = [
        "data.paired.urls=" + "::".join(clipart_shards[1:]),
        f"data.val_urls={clipart_shards[0]}",
    ]
    config = load_config("m3ae_pretrain:tiny", urls)
    del config["task"]
    assert make_task(config).name == "M3AE tiny"
