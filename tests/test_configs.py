"""Every shipped config builds a model; overrides are checked by key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from m3ae.config import apply_override, config_files, load_config
from m3ae.model import M3AE, model_config

RECIPES = ["local", "local,mae", "cpu", "cpu,mae", "tiny", "small", "base", "large", "huge"]
ARGS = {"m3ae_pretrain": RECIPES}


FINETUNE = ["cpu", "cpu,openclipart", "cpu,mnist", "small", "base", "large", "huge,fashion-mnist"]


def test_every_config_file_is_covered():
    # LM recipes (configs/lm_fcm.py) have their pulse tests in tests/test_lm_train.py; the
    # fine-tuning recipes train in tests/test_finetune.py.
    assert {p.stem for p in config_files()} == set(ARGS) | {"lm_fcm", "m3ae_finetune"}


@pytest.mark.parametrize("arg", FINETUNE)
def test_finetune_config_builds_a_classifier(arg):
    from m3ae.classifier import Classifier, classifier_config

    config = load_config(f"m3ae_finetune:{arg}")
    assert config.task == "m3ae.finetune"
    assert config.data.dataset == (arg.split(",")[1] if "," in arg else "fashion-mnist")
    model = Classifier(**classifier_config(model_config(config.model_size), 10, **config.model))
    size = config.data.image_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    )
    assert shapes["params"]["head"]["kernel"].shape == (model.emb_dim, 10)
    assert model.patch_size == (8 if arg.startswith("cpu") else 16)
    assert 0 < config.finetune.layer_decay < 1 and config.model.drop_path > 0
    if arg == "base":  # MAE's ViT-B fine-tuning recipe
        assert (config.finetune.layer_decay, config.optim.base_lr) == (0.65, 5e-4)
        assert config.data.randaugment == "rand-m9-mstd0.5-inc1" and size == 224


def test_finetune_config_rejects_unknown_recipes():
    with pytest.raises(ValueError, match="use cpu or one of"):
        load_config("m3ae_finetune:tiny")
    with pytest.raises(ValueError, match="at most one dataset"):
        load_config("m3ae_finetune:cpu,mnist,openclipart")


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_builds(name, arg):
    config = load_config(f"{name}:{arg}")
    model = M3AE(**model_config(config.model_size, **{**config.model, "vocab_size": 1000}))
    size = config.data.image_size
    image = jnp.zeros((1, size, size, 3))
    text = jnp.zeros((1, config.data.text_length), jnp.int32) if model.use_text else None
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}
    shapes = jax.eval_shape(lambda: model.init(rngs, image, text))
    assert sum(x.size for x in jax.tree.leaves(shapes)) > 5e4
    assert config.optim.batch_size > 0 and config.optim.base_lr > 0


def test_overrides():
    config = load_config("m3ae_pretrain:local", ["optim.base_lr=1e-3", "model.scan=True"])
    assert config.optim.base_lr == 1e-3 and config.model.scan is True
    apply_override(config, "optim.epochs=3")  # int into a float field stays a float
    assert config.optim.epochs == 3
    with pytest.raises(KeyError, match="optim.bsae_lr.*base_lr"):
        apply_override(config, "optim.bsae_lr=1")
    with pytest.raises(KeyError, match="nope"):
        apply_override(config, "nope.x=1")
    with pytest.raises(ValueError, match="key=value"):
        apply_override(config, "optim.base_lr")
    with pytest.raises(FileNotFoundError):
        load_config("does_not_exist:local")


@pytest.mark.parametrize("arg", ARGS["m3ae_pretrain"])
def test_config_has_a_pulse(arg, clipart_shards, tmp_path):
    """Two training steps of every shipped recipe, with its model shrunk to the tiny size."""
    from m3ae.trainer.train import train

    small = [
        "model_size=tiny",
        "model.patch_size=8",
        f"data.{'image_only' if 'mae' in arg else 'paired'}.urls=" + "::".join(clipart_shards[1:]),
        f"data.val_urls={clipart_shards[0]}",
        "data.image_size=32",
        "data.text_length=16",
        "data.workers=1",
        "optim.batch_size=8",
        "optim.steps=2",
        "logging.every=1",
        "logging.peak_flops=1e9",
        "logging.tensorboard=False",
        "eval.batches=1",
    ]
    summary = train(load_config(f"m3ae_pretrain:{arg}", small), str(tmp_path))
    assert summary["steps"] == 2 and summary["last_loss"] > 0
