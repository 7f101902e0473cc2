"""A small WordPiece vocabulary trained on the captions of webdataset shards (`m3ae vocab`).

    m3ae vocab --data 'data/openclipart-64/{00001..00005}.tar' --vocab-size 4096 --out vocab/
    tok = pipelines.tokenizer.load_tokenizer("vocab/")   # then data.tokenizer / model vocab size

A tiny CPU model with BERT-uncased's 30,522-row embedding and output tables spends most of its
parameters on words its captions never use; a vocabulary learnt from the captions themselves is
a few thousand rows. BERT-uncased conventions throughout: BertNormalizer (clean text, lowercase,
strip accents, CJK split), BertPreTokenizer, `##` continuation pieces, [PAD] = 0 (the model pads
with 0 and masks padding), [UNK] = 1, [CLS], [SEP], [MASK].

Captions are read as the training loader reads them (`pipelines.loader.make_example`, kind
"text"): `.txt` first, else the `.json` caption; unreadable shards and members, bad encodings and
empty captions are counted by reason and skipped. The merges are learnt here rather than with
`tokenizers.trainers.WordPieceTrainer`, which assigns ids in hash-map order and breaks count
ties by id, so the same captions give a different vocabulary from run to run (huggingface/
tokenizers#1794; 22 distinct token sets in 50 runs with tokenizers 0.23). This learner is the
same frequency-based merge algorithm with ties broken by the pieces' text: same shards, same
vocab.txt. The `tokenizers` library provides the normalizer, pre-tokenizer, WordPiece model
(greedy longest match) and tokenizer.json.

Written to `out_dir`: tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast),
vocab.txt (one token per line, in id order) and vocab_stats.json. The directory is loaded back
with `load_tokenizer` and checked before returning.

Measured on the demo shards (data/openclipart-64/{00001..00005}.tar: 1,992 captions, 16,919
words, 2,623 distinct), and in brackets on the held-out shard 00000 (400 captions, 391 of their
789 distinct words unseen in training). UNK: the fraction of caption words that become [UNK].

    vocabulary                      UNK in-sample [held-out]   tokens per caption [held-out]
    BERT-uncased, 30,522            0.00 % [0.00 %]            10.78 [11.06]
    --vocab-size 1024               0.00 % [0.06 %]            11.84 [12.16]
    --vocab-size 2048               0.00 % [0.06 %]            10.35 [11.07]
    --vocab-size 4096 (stops, 2328) 0.00 % [0.06 %]            10.03 [10.85]
    4096 with --min-frequency 1     0.00 % [0.06 %]             9.25 [10.63]

(`tokenizers`' own trainer: 11.76 [12.08] at 1024, 10.28 [10.95] at 2048.) On these short
captions 4096 is more than min_frequency 2 allows: learning stops at 2,328 tokens.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.shards import expand_urls, read_shard
from pipelines.tfrecord import TFRecordFeatures

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, [PAD] first
PREFIX = "##"
MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: longer words are [UNK] anyway
FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab_stats.json")

Log = Callable[[str], None]


@dataclass
class Captions:
    """The captions read from some shards, and what was skipped, by reason."""

    texts: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    shards: int = 0


def read_captions(
    urls: str | Sequence[str],
    limit: int | None = None,
    log: Log | None = None,
    tfrecord: TFRecordFeatures | None = None,
) -> Captions:
    """The captions the training loader would use, in shard order, at most `limit` of them
    (`tfrecord`: the feature names of TFRecord files, as the loader's)."""
    from pipelines.loader import make_example  # the loader's own caption rules, kept in step

    out = Captions()
    rng = np.random.default_rng(0)  # unused for text-only examples; make_example wants one
    for url in expand_urls(urls):
        # A typo in a local path is an input error, not a damaged shard to count and skip.
        if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url):
            raise FileNotFoundError(f"shard {url} does not exist")
        before = len(out.texts)
        for raw in read_shard(url, tfrecord=tfrecord):
            example = make_example(raw, "text", 0, False, rng, 0, False)
            if isinstance(example, str):
                out.skipped[example] += 1
            else:
                out.texts.append(example.caption)
                if limit is not None and len(out.texts) >= limit:
                    break
        out.shards += 1
        if log:
            log(f"vocab: {url}: {len(out.texts) - before} captions ({len(out.texts)} in all)")
        if limit is not None and len(out.texts) >= limit:
            break
    return out


def _bert_pipeline():
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    return normalizer, pre_tokenizers.BertPreTokenizer()


def count_words(texts: Iterable[str]) -> Counter:
    """Normalized, pre-tokenized words of `texts` with their counts (BERT-uncased rules)."""
    normalizer, pre_tokenizer = _bert_pipeline()
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def learn_wordpiece(
    word_counts: Mapping[str, int], vocab_size: int, min_frequency: int = 2
) -> tuple[list[str], str]:
    """WordPiece tokens in id order (specials, alphabet, merges) and why learning stopped.

    Repeatedly merges the most frequent adjacent pair of pieces (ties: the smaller pair of
    strings), as the `tokenizers` trainer does, until the vocabulary is full or no pair occurs
    `min_frequency` times.
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens")
    words = sorted((w, c) for w, c in word_counts.items() if len(w) <= MAX_WORD_CHARS)
    chars: Counter = Counter()
    for word, count in words:
        for ch in word:
            chars[ch] += count
    # Both forms of every character, so a character seen only word-initially still has a
    # continuation piece (and vice versa): a held-out word then never becomes [UNK] for it.
    budget = (vocab_size - len(SPECIAL_TOKENS)) // 2
    kept = sorted(sorted(chars, key=lambda ch: (-chars[ch], ch))[:budget])
    vocab = [*SPECIAL_TOKENS, *kept, *(PREFIX + ch for ch in kept)]
    known = set(vocab)

    alphabet = set(kept)
    pieces = [[w[0], *(PREFIX + ch for ch in w[1:])] for w, _ in words]
    counts = [c for _, c in words]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, (word, _) in enumerate(words):
        if not set(word) <= alphabet:
            continue  # a character outside the alphabet: the word is [UNK], nothing to learn
        for pair in pairwise(pieces[i]):
            pairs[pair] += counts[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size:
        if not heap:
            return vocab, "no pairs left to merge"
        neg, a, b = heapq.heappop(heap)
        if pairs.get((a, b), 0) != -neg or -neg == 0:
            continue  # a stale heap entry: the pair's count has changed since it was pushed
        if -neg < min_frequency:
            return vocab, f"no pair occurs min_frequency={min_frequency} times"
        merged = a + b[len(PREFIX) :]
        if merged not in known:  # "##ab"+"##c" and "##a"+"##bc" both make "##abc"
            known.add(merged)
            vocab.append(merged)
        changed: Counter = Counter()
        for i in where.pop((a, b)):
            old = pieces[i]
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            pieces[i] = new
            for pair in pairwise(old):
                changed[pair] -= counts[i]
            for pair in pairwise(new):
                changed[pair] += counts[i]
                where.setdefault(pair, set()).add(i)
        for pair, delta in changed.items():
            if delta:
                pairs[pair] += delta
                heapq.heappush(heap, (-pairs[pair], *pair))
    return vocab, "vocab_size reached"


def build_tokenizer(vocab: Sequence[str]):
    """A `tokenizers.Tokenizer` with BERT-uncased's pipeline over the WordPiece `vocab`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    ids = {token: i for i, token in enumerate(vocab)}
    model = models.WordPiece(
        ids,
        unk_token="[UNK]",
        continuing_subword_prefix=PREFIX,
        max_input_chars_per_word=MAX_WORD_CHARS,
    )
    tok = Tokenizer(model)
    tok.normalizer, tok.pre_tokenizer = _bert_pipeline()
    tok.decoder = decoders.WordPiece(prefix=PREFIX)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    # Marked special: "[MASK]" in text is one token, and decoding can skip them.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def caption_token_stats(texts: Sequence[str], tokenizer: Any) -> dict[str, float]:
    """[UNK] rate over caption words and mean tokens per caption (no [CLS]/[SEP])."""
    # A copy without padding/truncation: transformers leaves the padding of its last
    # `padding="max_length"` call switched on in the backend, which would count the pads.
    backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", tokenizer))
    backend.no_padding()
    backend.no_truncation()
    unk = backend.token_to_id("[UNK]")
    normalizer, pre_tokenizer = _bert_pipeline()
    n_words = sum(len(pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))) for t in texts)
    encodings = backend.encode_batch(list(texts), add_special_tokens=False)
    n_tokens = sum(len(e.ids) for e in encodings)
    n_unk = sum(e.ids.count(unk) for e in encodings)  # WordPiece: one [UNK] per unknown word
    return {
        "words": n_words,
        "unk_words": n_unk,
        "unk_word_rate": n_unk / max(n_words, 1),
        "tokens_per_caption": n_tokens / max(len(texts), 1),
    }


def _write(out: Path, vocab: list[str], stats: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if foreign:  # stray files (another tokenizer's) would change what AutoTokenizer loads
        raise FileExistsError(f"{out} holds files other than a vocabulary's: {foreign[:3]}")
    build_tokenizer(vocab).save(str(out / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # loads tokenizer.json as it is
        "do_lower_case": True,
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8")
    (out / "vocab_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def check_vocab_dir(out: Path, vocab: Sequence[str], texts: Sequence[str]):
    """Load `out` with `load_tokenizer` and check it against `vocab`; the loaded tokenizer."""
    from pipelines.tokenizer import load_tokenizer, tokenize

    # Uncached: a directory rewritten in this process must be read again, not remembered.
    tok = load_tokenizer.__wrapped__(out)
    ids = {t: i for i, t in enumerate(vocab)}
    problems = []
    if tok.get_vocab() != ids or len(tok) != len(vocab):
        problems.append(f"vocabulary differs ({len(tok)} tokens loaded, {len(vocab)} written)")
    if (tok.pad_token_id, tok.unk_token_id) != (0, 1):
        problems.append(f"[PAD]/[UNK] ids are {tok.pad_token_id}/{tok.unk_token_id}, not 0/1")
    words = [w for w in sorted(count_words(texts)) if w in ids and not w.startswith(PREFIX)][:32]
    got = tok(" ".join(words), add_special_tokens=False)["input_ids"]
    if got != [ids[w] for w in words]:
        problems.append(
            f"in-vocabulary words {words[:5]}... do not map to their own ids: {got[:5]}"
        )
    sample = list(texts[:64])
    length = 2 + max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in sample)
    batch, padding = tokenize(sample, length, tok)
    if batch.max() >= len(vocab) or batch.min() < 0:
        problems.append(f"token ids outside [0, {len(vocab)})")
    if not (padding.any() and (batch[padding == 1] == 0).all()):
        problems.append("padding is not id 0")
    if problems:
        raise RuntimeError(f"the vocabulary written to {out} does not load back: {problems}")
    return tok


def train_caption_vocab(
    urls: str | Sequence[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    limit: int | None = None,
    log: Log | None = None,
    tfrecord: TFRecordFeatures | None = None,
) -> Path:
    """Learn a WordPiece vocabulary from the shards' captions, write it to `out_dir`, check it.

    Returns `out_dir`. The vocabulary is smaller than `vocab_size` when no pair of pieces
    occurs `min_frequency` times any more (vocab_stats.json says why learning stopped).
    Raises ValueError/FileNotFoundError when `urls` match nothing or hold no captions.
    """
    if min_frequency < 1 or (limit is not None and limit < 1):
        raise ValueError("min_frequency and limit must be at least 1")
    captions = read_captions(urls, limit, log, tfrecord)
    if not captions.texts:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(captions.skipped.items()))
        raise ValueError(f"no captions in {urls}" + (f" (skipped: {reasons})" if reasons else ""))
    words = count_words(captions.texts)
    if log:
        log(f"vocab: {len(captions.texts)} captions, {len(words)} distinct words; learning")
    vocab, stopped = learn_wordpiece(words, vocab_size, min_frequency)
    stats: dict[str, Any] = {
        "shards": captions.shards,
        "captions": len(captions.texts),
        "skipped": sum(captions.skipped.values()),
        "skipped_by_reason": dict(sorted(captions.skipped.items())),
        "distinct_words": len(words),
        "requested_vocab_size": vocab_size,
        "vocab_size": len(vocab),
        "min_frequency": min_frequency,
        "stopped": stopped,
    }
    out = Path(out_dir)
    _write(out, vocab, stats)
    tok = check_vocab_dir(out, vocab, captions.texts)
    stats["trained"] = caption_token_stats(captions.texts, tok)
    try:
        from pipelines.tokenizer import load_tokenizer

        stats["bert_uncased"] = caption_token_stats(captions.texts, load_tokenizer())
    except (ModuleNotFoundError, RuntimeError) as e:  # the comparison is optional
        stats["bert_uncased"] = f"unavailable: {e}"
    (out / "vocab_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out


def summary_text(out: Path) -> str:
    """One line from `out`/vocab_stats.json."""
    s = json.loads((out / "vocab_stats.json").read_text())
    this, bert = s["trained"], s["bert_uncased"]
    line = (
        f"Wrote a {s['vocab_size']}-token WordPiece vocabulary to {out} from {s['captions']} "
        f"captions ({s['distinct_words']} distinct words; skipped {s['skipped']}): "
        f"[UNK] {100 * this['unk_word_rate']:.2f}% of words, "
        f"{this['tokens_per_caption']:.1f} tokens per caption"
    )
    if isinstance(bert, dict):
        line += (
            f" (BERT-uncased: {100 * bert['unk_word_rate']:.2f}%, {bert['tokens_per_caption']:.1f})"
        )
    return line + "."


def add_vocab_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``vocab`` on an argparse subparsers object (``set_defaults(func=run_vocab)``)."""
    p = subparsers.add_parser("vocab", help="train a WordPiece vocabulary on shard captions")
    p.add_argument(
        "--data", "--shards", dest="shards", metavar="DATA", required=True,
        help="caption shards: brace pattern, glob, directory or list (::) (--shards: old name)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (load_tokenizer reads it)")
    p.add_argument("--vocab-size", type=int, default=4096, help="at most this many tokens")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair")
    p.add_argument("--limit", type=int, default=None, help="read only the first N captions")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_vocab)
    return p


def run_vocab(args: argparse.Namespace) -> int:
    """Train the vocabulary that ``args`` describe and print its summary line."""
    out = train_caption_vocab(
        args.shards,
        args.out,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        limit=args.limit,
        log=(lambda m: print(m, flush=True)) if args.progress else None,
    )
    print(summary_text(out))
    return 0
