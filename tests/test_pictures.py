"""Reconstruction grids: pixel cells, the caption panel and its strings, the training call."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from m3ae.model import M3AE, model_config
from m3ae.pictures import caption_lines, save_reconstruction_grid, to_uint8
from pipelines.tokenizer import load_tokenizer, tokenize

CAPTIONS = ["a red apple on a wooden table", "rocket launch"]
MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
CELL, GAP, PANEL = 128, 4, 448  # 16 px pictures are enlarged 8x to the default 128 px cells


@pytest.fixture(scope="module")
def reconstructed() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A tiny M3AE's `reconstruct` output for two real captions and random 16x16 images."""
    ids, pad = tokenize(CAPTIONS, 12)
    image = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    model = M3AE(**model_config("tiny", patch_size=4))
    rngs = {"params": jax.random.PRNGKey(1), "noise": jax.random.PRNGKey(2)}
    variables = model.init(rngs, image, ids, pad)
    pics = model.apply(
        variables, image, ids, pad, rngs={"noise": rngs["noise"]}, method=M3AE.reconstruct
    )
    return jax.device_get(pics), ids, pad


def test_caption_lines_bracket_removed_real_tokens():
    tok = load_tokenizer()
    ids, pad = tokenize(CAPTIONS[:1], 12)
    ids, pad = ids[0], pad[0]  # 7 real tokens, then padding
    removed = np.zeros(12, np.float32)
    removed[[1, 5, 9]] = 1.0  # "red", "wooden", and a padding slot that must be ignored
    caption, predicted, right, n = caption_lines(ids, pad, removed, ids, tok)
    assert caption == "a [red] apple on a [wooden] table"
    assert predicted == caption and (right, n) == (2, 2)

    guesses = ids.copy()
    guesses[1] = tok.convert_tokens_to_ids("blue")
    guesses[9] = tok.convert_tokens_to_ids("blue")  # a wrong guess on padding does not count
    caption, predicted, right, n = caption_lines(ids, pad, removed, guesses, tok)
    assert predicted == "a [blue] apple on a [wooden] table" and (right, n) == (1, 2)


def test_caption_lines_join_wordpieces():
    tok = load_tokenizer()
    ids, _ = tokenize(["playing skateboarding"], 3)  # playing, skate, ##boarding
    assert tok.convert_ids_to_tokens(ids[0].tolist())[2] == "##boarding"
    removed = np.array([0.0, 0.0, 1.0])
    caption, predicted, right, n = caption_lines(ids[0], None, removed, ids[0], tok)
    assert caption == predicted == "playing skate[boarding]" and (right, n) == (1, 1)
    caption, *_ = caption_lines(ids[0], None, np.zeros(3), ids[0], tok)
    assert caption == "playing skateboarding"


def test_grid_with_captions(reconstructed, tmp_path):
    pics, ids, pad = reconstructed
    tok = load_tokenizer()
    for b in range(2):  # the model's own masks: only real tokens are bracketed and counted
        caption, predicted, right, n = caption_lines(
            ids[b], pad[b], pics["text_mask"][b], pics["text_predictions"][b], tok
        )
        real_removed = int(((pics["text_mask"][b] > 0.5) & (pad[b] < 0.5)).sum())
        assert caption.count("[") == predicted.count("[") == n == real_removed > 0
        assert 0 <= right <= n
    path = save_reconstruction_grid(
        tmp_path / "grid.png", pics, MEAN, STD, text=ids, text_padding_mask=pad, tokenizer=tok
    )
    one = {k: v[:1] for k, v in pics.items()}
    path1 = save_reconstruction_grid(
        tmp_path / "one.png", one, MEAN, STD, text=ids[:1], text_padding_mask=pad[:1]
    )
    with Image.open(path) as im, Image.open(path1) as im1:
        assert im.mode == "RGB" and im.width == 4 * (CELL + GAP) + GAP + PANEL + GAP
        assert im.height - im1.height == CELL + GAP  # one row per picture, below a header
        grid = np.asarray(im)
    top = grid.shape[0] - 2 * (CELL + GAP) - GAP
    cell = grid[top + GAP : top + GAP + CELL, GAP : GAP + CELL]
    expected = to_uint8(pics["input"][0], MEAN, STD).repeat(8, axis=0).repeat(8, axis=1)
    np.testing.assert_array_equal(cell, expected)  # nearest upscaling, exact pixels
    panel = grid[top + GAP : top + GAP + CELL, 4 * (CELL + GAP) + GAP :]
    assert (panel < 128).any()  # text was drawn


def test_grid_image_only(reconstructed, tmp_path):
    pics, _, _ = reconstructed
    image_only = {k: v for k, v in pics.items() if not k.startswith("text_")}
    path = save_reconstruction_grid(tmp_path / "grid.png", image_only, MEAN, STD)
    with Image.open(path) as im:
        assert im.width == 4 * (CELL + GAP) + GAP
        assert im.height > 2 * (CELL + GAP) + GAP  # the rows plus the column headers


def test_save_pictures_passes_captions(tmp_path):
    from m3ae.task import save_pictures
    from m3ae.trainer.sharding import make_mesh

    ids, pad = tokenize(CAPTIONS, 12)
    image = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    model = M3AE(**model_config("tiny", patch_size=4))
    params = model.init(
        {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}, image * 0.0, ids, pad
    )["params"]
    batch = {"image": image, "text": ids, "text_padding_mask": pad}
    path = save_pictures(model, params, batch, MEAN, STD, 7, tmp_path, make_mesh())
    with Image.open(path) as im:
        assert path.name == "reconstruction_000007.png"
        assert im.width == 4 * (CELL + GAP) + GAP + PANEL + GAP


def test_held_out_pictures_take_one_drawing_per_category_first(clipart_shards):
    """The pictures' held-out set is varied: the first drawing of each category in the val
    shards, before any category repeats (the first rows alone were mostly one category)."""
    from m3ae.configs.m3ae_pretrain import get_config
    from m3ae.task import held_out_batch, varied_rows

    assert varied_rows([3, 3, 1, 3, 2, 1], 4).tolist() == [0, 2, 4, 1]
    config = get_config("local")
    config.data.val_urls = str(Path(clipart_shards[0]).parent)  # the directory
    config.data.tokenizer = ""
    batch = held_out_batch(config, count=12, scan=96)
    assert batch["image"].shape == (12, 64, 64, 3) and batch["text"].shape == (12, 24)
    assert len(set(batch["cls"].tolist())) == 12, batch["cls"]  # 96 drawings: > 12 categories
