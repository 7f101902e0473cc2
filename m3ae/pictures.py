"""Reconstruction pictures: one row per image — input, masked input, reconstruction, and the
reconstruction with the visible patches pasted back — saved as a PNG grid.

With captions, a text panel beside each row shows the caption with its masked tokens in
brackets, the model's predicted tokens in their place, and the accuracy on the masked tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLUMNS = ("input", "masked", "reconstruction", "pasted")
TEXT_HEADER = "caption / predicted words"
INK, PREDICTED_INK, SCORE_INK = (0, 0, 0), (20, 60, 170), (90, 90, 90)


class Tokenizer(Protocol):
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


def to_uint8(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalized `(..., 3)` pixels back to uint8."""
    x = np.nan_to_num(np.asarray(x, np.float32))  # a diverged model must not break the picture
    return (np.clip(x * std + mean, 0.0, 1.0) * 255).round().astype(np.uint8)


def join_pieces(pieces: list[str], continued: list[bool]) -> str:
    """WordPiece strings -> text: a `##` continuation sticks to the piece before it."""
    out = ""
    for piece, cont in zip(pieces, continued, strict=True):
        out += piece if cont or not out else " " + piece
    return out


def caption_lines(
    ids: np.ndarray,
    padding: np.ndarray | None,
    removed: np.ndarray,
    predicted: np.ndarray,
    tokenizer: Tokenizer,
) -> tuple[str, str, int, int]:
    """One row's `(caption, predicted caption, n_right, n_masked)`, all `(L,)` inputs.

    Both captions keep the real (non-padding) tokens in order; masked ones are bracketed, in the
    second with the model's prediction instead. Spacing follows the real caption's `##` pieces
    so the two lines align word for word even when a prediction is a different kind of piece.
    """
    ids = np.asarray(ids).astype(np.int64)
    real = np.ones(ids.shape, bool) if padding is None else np.asarray(padding) < 0.5
    masked = (np.asarray(removed) > 0.5) & real
    predicted = np.asarray(predicted).astype(np.int64)
    keep = np.flatnonzero(real)
    truth = tokenizer.convert_ids_to_tokens([int(i) for i in ids[keep]])
    guess = tokenizer.convert_ids_to_tokens([int(i) for i in predicted[keep]])
    continued = [t.startswith("##") for t in truth]
    caption, prediction = [], []
    for t, g, m in zip(truth, guess, masked[keep], strict=True):
        t, g = t.removeprefix("##"), g.removeprefix("##")
        caption.append(f"[{t}]" if m else t)
        prediction.append(f"[{g}]" if m else t)
    n_right = int(((predicted == ids) & masked).sum())
    return (
        join_pieces(caption, continued),
        join_pieces(prediction, continued),
        n_right,
        int(masked.sum()),
    )


def wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` px; a word wider than a line is split by characters."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while font.getlength(line) > width and len(line) > 1:
            cut = len(line) - 1
            while cut > 1 and font.getlength(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    return [*lines, line] if line else lines


def draw_panel(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    xy: tuple[int, int],
    size: tuple[int, int],
    paragraphs: list[tuple[str, tuple[int, int, int]]],
    line_height: int,
) -> None:
    """Wrapped coloured paragraphs in a `size` box; a paragraph cut short ends in '...'."""
    (x, y), (w, h) = xy, size
    wrapped = [wrap(text, font, w) for text, _ in paragraphs]
    # Lines are dealt round-robin so a long caption cannot crowd out the predictions or the
    # score, nor spill into the next row.
    quota, left = [0] * len(wrapped), max(1, h // line_height)
    while left and any(q < len(lines) for q, lines in zip(quota, wrapped, strict=True)):
        for i, lines in enumerate(wrapped):
            if left and quota[i] < len(lines):
                quota[i], left = quota[i] + 1, left - 1
    row = 0
    for lines, q, (_, ink) in zip(wrapped, quota, paragraphs, strict=True):
        shown = lines[:q]
        if 0 < q < len(lines):
            last = shown[-1]
            while last and font.getlength(last + "...") > w:
                last = last[:-1]
            shown[-1] = last + "..."
        for line in shown:
            draw.text((x, y + row * line_height), line, fill=ink, font=font)
            row += 1


def caption_font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (nothing to download) at a size where a masked comma, `[,]`,
    stays legible; Pillow's small bitmap font where it was built without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def save_reconstruction_grid(
    path: str | os.PathLike,
    pictures: dict[str, np.ndarray],
    mean: np.ndarray,
    std: np.ndarray,
    text: np.ndarray | None = None,
    text_padding_mask: np.ndarray | None = None,
    tokenizer: Tokenizer | None = None,
    min_cell: int = 128,
    gap: int = 4,
    text_width: int = 448,
) -> Path:
    """Write the `M3AE.reconstruct` output as a PNG grid (cells upscaled to >= `min_cell` px).

    With `text` (the `(B, L)` ids given to `reconstruct`) a `text_width` px caption panel is
    added to each row; `tokenizer` defaults to the bundled BERT-uncased one.
    """
    B, H, W, _ = pictures["input"].shape
    scale = max(1, -(-min_cell // max(H, W)))  # ceil: small pictures are enlarged
    ch, cw = H * scale, W * scale
    font = caption_font()
    line_height = int(font.getbbox("Ag[y]")[3]) + 3
    top = line_height + gap  # the column header strip
    panel = text_width if text is not None else 0
    width = len(COLUMNS) * (cw + gap) + gap + (panel + gap if panel else 0)
    canvas = np.full((top + B * (ch + gap) + gap, width, 3), 255, np.uint8)
    for b in range(B):
        for c, name in enumerate(COLUMNS):
            cell = to_uint8(pictures[name][b], mean, std)
            cell = cell.repeat(scale, axis=0).repeat(scale, axis=1)  # (ch, cw, 3), nearest
            y, x = top + gap + b * (ch + gap), gap + c * (cw + gap)
            canvas[y : y + ch, x : x + cw] = cell
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    headers = [*COLUMNS, TEXT_HEADER] if panel else list(COLUMNS)
    for c, name in enumerate(headers):
        draw.text((gap + c * (cw + gap), gap), name, fill=INK, font=font)
    if text is not None:
        if tokenizer is None:
            from pipelines.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        ids = np.asarray(text)
        pad = None if text_padding_mask is None else np.asarray(text_padding_mask)
        removed, guesses = (
            np.asarray(pictures["text_mask"]),
            np.asarray(pictures["text_predictions"]),
        )
        for b in range(B):
            caption, predicted, right, n = caption_lines(
                ids[b], None if pad is None else pad[b], removed[b], guesses[b], tokenizer
            )
            score = f"{right}/{n} masked tokens right" if n else "no masked tokens"
            paragraphs = [
                (f"caption: {caption}", INK),
                (f"predicted: {predicted}", PREDICTED_INK),
                (score, SCORE_INK),
            ]
            xy = (gap + len(COLUMNS) * (cw + gap), top + gap + b * (ch + gap))
            draw_panel(draw, font, xy, (panel, ch), paragraphs, line_height)
    path = Path(path)
    image.save(path)
    return path
