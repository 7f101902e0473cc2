"""Tests for `m3ae vocab` (pipelines.vocab) on real openclipart shards written by `m3ae shards`.

The shards are conftest's `clipart_shards` (95 drawings in 4 shards of 24, captions = titles and
keywords): 72 training captions in the first 3 shards (197 distinct words), the 4th held out.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from m3ae.cli import main
from pipelines.tokenizer import load_tokenizer, tokenize
from pipelines.vocab import (
    SPECIAL_TOKENS,
    caption_token_stats,
    count_words,
    learn_wordpiece,
    read_captions,
    train_caption_vocab,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def split(clipart_shards) -> tuple[list[str], list[str]]:
    """(training shards, held-out shard)."""
    assert len(clipart_shards) == 4
    return clipart_shards[:3], clipart_shards[3:]


@pytest.fixture(scope="module")
def vocab250(split, tmp_path_factory) -> Path:
    return train_caption_vocab(split[0], tmp_path_factory.mktemp("v") / "v250", vocab_size=250)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_loads_with_the_requested_size_and_pad_zero(vocab250, split):
    files = sorted(p.name for p in vocab250.iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab_stats.json"]
    tok = load_tokenizer(vocab250)
    vocab = _lines(vocab250 / "vocab.txt")
    stats = json.loads((vocab250 / "vocab_stats.json").read_text())
    # 197 distinct words give more than 250 tokens' worth of merges: the size is as asked.
    assert len(vocab) == len(tok) == stats["vocab_size"] == 250, stats
    assert stats["stopped"] == "vocab_size reached"
    assert vocab[:5] == list(SPECIAL_TOKENS) and len(set(vocab)) == 250
    assert tok.get_vocab() == {t: i for i, t in enumerate(vocab)}
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 4)
    assert tok.convert_ids_to_tokens(0) == "[PAD]"
    assert stats["captions"] == 72 and stats["skipped"] == 0 and stats["distinct_words"] == 197

    captions = read_captions(split[0]).texts
    ids, padding = tokenize(captions, 24, tok)
    assert ids.shape == (72, 24) and ids.max() < 250 and ids.min() >= 0
    assert padding.any() and (ids[padding == 1] == 0).all() and (ids[padding == 0] != 0).all()
    # BERT-uncased conventions: lowercased, accents stripped, punctuation split, ## pieces.
    word = next(w for w in vocab if w.isalpha() and len(w) > 3)
    assert tok.tokenize(f"{word.upper()},{word}.") == [word, ",", word, "."]
    assert tok.tokenize("Café") == tok.tokenize("cafe")
    assert any(t.startswith("##") for t in tok.tokenize(" ".join(captions)))


def test_captions_tokenize_without_unk_and_compactly(vocab250, split, tmp_path):
    tok = load_tokenizer(vocab250)
    train, heldout = (read_captions(s).texts for s in split)
    ours, theirs = caption_token_stats(train, tok), caption_token_stats(heldout, tok)
    stats = json.loads((vocab250 / "vocab_stats.json").read_text())
    assert stats["trained"] == ours and isinstance(stats["bert_uncased"], dict)
    # Every character of the training captions is in the alphabet: no in-sample [UNK] at all;
    # held-out words are spelled with pieces (the 4th shard has 52 words never seen in training).
    assert ours["unk_words"] == 0 and ours["words"] == 584
    assert theirs["unk_word_rate"] < 0.03, theirs
    # The merges are used: far fewer tokens than characters (34.5 non-space chars per caption).
    chars = np.mean([len("".join(c.split())) for c in train])
    assert ours["tokens_per_caption"] < 0.5 * chars, (ours, chars)
    # A bigger vocabulary fits its own captions better, and then better than BERT-uncased's
    # 30,522 general-purpose tokens (9.1 vs 11.2 tokens per caption).
    big = train_caption_vocab(split[0], tmp_path / "v600", vocab_size=600, min_frequency=1)
    big_stats = caption_token_stats(train, load_tokenizer(big))
    bert = caption_token_stats(train, load_tokenizer())
    assert big_stats["tokens_per_caption"] < ours["tokens_per_caption"]
    assert big_stats["tokens_per_caption"] < bert["tokens_per_caption"], (big_stats, bert)


def test_small_corpus_gives_a_smaller_vocabulary(split, tmp_path):
    out = train_caption_vocab(split[0], tmp_path / "v", vocab_size=400, min_frequency=2)
    stats = json.loads((out / "vocab_stats.json").read_text())
    # Only 313 tokens' worth of pairs occur twice in 72 captions; asking for 400 gives that.
    assert stats["requested_vocab_size"] == 400
    assert 250 < stats["vocab_size"] < 400 == stats["requested_vocab_size"]
    assert stats["stopped"] == "no pair occurs min_frequency=2 times"
    assert len(load_tokenizer(out)) == stats["vocab_size"]


def test_same_shards_same_files_across_processes(vocab250, split, tmp_path):
    # The second run is another process with another string-hash seed, through the CLI.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "m3ae.cli", "vocab", "--data", "::".join(split[0])]
    cmd += ["--vocab-size", "250", "--out", str(tmp_path / "again")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert (
        summary.startswith("Wrote a 250-token WordPiece vocabulary") and "BERT-uncased" in summary
    )
    assert "vocab: " in done.stdout  # per-shard progress
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "vocab_stats.json"):
        assert (tmp_path / "again" / name).read_bytes() == (vocab250 / name).read_bytes(), name


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bad_members_are_counted_and_skipped(split, tmp_path):
    meta = json.dumps({"caption": "a cat from the json"}).encode()
    bad = _tar(
        tmp_path / "bad.tar",
        [
            ("a.txt", b"a red apple"),
            ("b.txt", b"\xff\xfe not utf-8"),
            ("c.txt", b"   "),
            ("d.jpg", b"no caption here"),
            ("e.json", meta),
        ],
    )
    good = Path(split[0][0]).read_bytes()
    (tmp_path / "truncated.tar").write_bytes(good[: len(good) // 2])
    urls = [str(bad), str(tmp_path / "truncated.tar")]
    captions = read_captions(urls)
    assert captions.texts[:2] == ["a red apple", "a cat from the json"]
    assert dict(captions.skipped) == {
        "bad_caption_encoding": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "truncated_tar": 1,
    }
    out = train_caption_vocab(urls, tmp_path / "v", vocab_size=120, min_frequency=1)
    stats = json.loads((out / "vocab_stats.json").read_text())
    assert stats["skipped"] == 4 and stats["captions"] == len(captions.texts)
    assert len(read_captions(urls, limit=3).texts) == 3


def test_learn_wordpiece_rules():
    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
    vocab, stopped = learn_wordpiece(counts, vocab_size=1000, min_frequency=3)
    assert vocab[:5] == list(SPECIAL_TOKENS) and stopped == "no pair occurs min_frequency=3 times"
    letters = sorted(set("".join(counts)))
    assert vocab[5:25] == letters + ["##" + c for c in letters]  # both forms of each letter
    # "##e ##s" and "##s ##t" both occur 9 times: the tie goes to the smaller pair of strings.
    assert vocab[25:27] == ["##es", "##est"] and "##st" not in vocab
    assert vocab[-1] == "widest" and "lower" not in vocab  # "low ##er" occurs only twice
    assert vocab == learn_wordpiece(dict(reversed(counts.items())), 1000, 3)[0]  # input order
    assert learn_wordpiece(counts, 30, 1)[0] == vocab[:30]  # a prefix: merges in one order
    assert count_words(["Héllo, WORLD!"]) == {"hello": 1, ",": 1, "world": 1, "!": 1}
    with pytest.raises(ValueError):
        learn_wordpiece(counts, 5)


@pytest.mark.parametrize("kind", ["missing", "glob", "empty_dir", "no_captions", "empty"])
def test_cli_bad_input_is_one_line_and_exit_2(kind, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    url = {
        "missing": str(tmp_path / "nope.tar"),
        "glob": str(tmp_path / "*.tar"),
        "empty_dir": str(tmp_path / "empty"),
        "no_captions": str(_tar(tmp_path / "x.tar", [("a.jpg", b"pixels")])),
        "empty": "",
    }[kind]
    assert main(["vocab", "--data", url, "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m3ae vocab: error: "), err
    assert (url or "''") in err[0]
    assert not (tmp_path / "v").exists()


def test_refuses_a_directory_with_other_files(split, tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "special_tokens_map.json").write_text("{}")
    with pytest.raises(FileExistsError, match="special_tokens_map.json"):
        train_caption_vocab(split[0], tmp_path / "v", vocab_size=100)
