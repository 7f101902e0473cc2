"""Documents for the causal LM: where they come from and how one becomes BPE tokens.

Three kinds of source, mixed freely in one URL list (brace patterns, globs, directories,
`::`-joined specs, as for image shards):

- webdataset tars (`*.tar`, or anything else that is not `.txt` / `.jsonl`): one document per
  sample, its `.txt` member (read by `pipelines.shards.read_shard`, with the same damage
  reporting: a truncated tar becomes one `truncated_tar` document and the shard ends);
- JSONL files (`*.jsonl`, `*.json`): one document per non-blank line, the string in field
  `text_field` (default `text`), key `FILE:LINE`;
- plain text files (`*.txt`): **one document per file**, key = the path. A file is the natural
  unit of a book or an article; a corpus of many short documents is better kept as JSONL or tar
  shards, where each document is its own sample (splitting files on blank lines would cut
  plays and poems into single speeches or stanzas).

A document is its UTF-8 text with surrounding whitespace stripped; bad ones are skip reasons,
counted by the loader: `bad_text_encoding`, `empty_text`, `missing_text`, `bad_json`,
`unsafe_member`, and the shard-level `truncated_tar`, `corrupt_tar`, `unreadable_shard`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from pipelines import storage
from pipelines.loader import UNSAFE_EXTS
from pipelines.shards import RawSample, expand_urls, open_shard, read_shard
from pipelines.tokenizer import GPT2_EOS

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
# What a directory in the URL list contributes, in this order (sorted within each kind).
_DIR_PATTERNS = ("*.tar", "*.jsonl", "*.txt")


def expand_text_urls(spec: str | Sequence[str]) -> list[str]:
    """Like `pipelines.shards.expand_urls`, but a directory gives its tars, JSONL and .txt files."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in specs for p in str(item).split("::") if p.strip()]
    urls: list[str] = []
    for part in parts:
        if storage.is_url(part) and not any(c in part for c in "*?[{") and storage.is_dir(part):
            base = part.rstrip("/")
            found = [f for pat in _DIR_PATTERNS for f in storage.glob(f"{base}/{pat}")]
            if not found:
                raise FileNotFoundError(f"no *.tar, *.jsonl or *.txt files under {part}")
            urls.extend(found)
        elif os.path.isdir(part):
            found = [f for pat in _DIR_PATTERNS for f in sorted(glob.glob(os.path.join(part, pat)))]
            if not found:
                raise FileNotFoundError(f"no *.tar, *.jsonl or *.txt files in directory {part}")
            urls.extend(found)
        else:
            urls.extend(expand_urls(part))
    if not urls:
        raise ValueError(f"no text sources in {spec!r}")
    return urls


def read_documents(url: str, skip: int = 0, text_field: str = "text") -> Iterator[RawSample]:
    """Raw documents of one source in file order, after the first `skip` (a `ShardStream` reader).

    Each yields a `RawSample` whose `txt` member holds the document's bytes, or an `error`.
    """
    lower = url.lower()
    if lower.endswith(JSONL_SUFFIXES):
        yield from _read_jsonl(url, skip, text_field)
    elif lower.endswith(TEXT_SUFFIXES):
        if skip == 0:
            yield _read_text_file(url)
    else:
        yield from read_shard(url, skip)


_open = open_shard  # s3:// and gs:// through fsspec, the rest through webdataset's gopen


def _read_text_file(url: str) -> RawSample:
    try:
        with _open(url) as f:
            return RawSample(url, url, 0, {"txt": f.read()})
    except Exception as e:  # noqa: BLE001 - any opener failure is this source's failure
        print(f"pipelines: text file {url}: {type(e).__name__}: {e}", flush=True)
        return RawSample(url, url, 0, error="unreadable_shard")


def _read_jsonl(url: str, skip: int, text_field: str) -> Iterator[RawSample]:
    try:
        stream = _open(url)
    except Exception as e:  # noqa: BLE001
        if skip == 0:
            print(f"pipelines: JSONL {url}: {type(e).__name__}: {e}", flush=True)
            yield RawSample(f"{url}#0", url, 0, error="unreadable_shard")
        return
    index = 0
    with stream:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            if index >= skip:
                yield _jsonl_document(line, RawSample(f"{url}:{lineno}", url, index), text_field)
            index += 1


def _jsonl_document(line: bytes, sample: RawSample, text_field: str) -> RawSample:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        sample.error = "bad_text_encoding"
        return sample
    except ValueError:
        sample.error = "bad_json"
        return sample
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        sample.error = "missing_text"
    else:
        sample.members["txt"] = text.encode("utf-8")
    return sample


def document_text(raw: RawSample) -> str:
    """The document's text, or raise `ValueError(reason)` with the reason it is skipped."""
    if raw.error is not None:
        raise ValueError(raw.error)
    if "txt" not in raw.members:
        unsafe = any(ext in UNSAFE_EXTS for ext in raw.members)
        raise ValueError("unsafe_member" if unsafe else "missing_text")
    try:
        text = raw.members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("bad_text_encoding") from None
    if not text:
        raise ValueError("empty_text")
    return text


def tokenize_documents(raws: Sequence[RawSample], tokenizer) -> list[np.ndarray | str]:
    """`[EOS] + bpe(text)` (int32) per document, or its skip reason; one batched BPE call.

    `encode_batch` runs the Rust tokenizer over all documents in parallel without the GIL, which
    is the fast path (see the throughput note in `pipelines.text`).
    """
    results: list[np.ndarray | str] = []
    texts: list[str] = []
    slots: list[int] = []
    for raw in raws:
        try:
            texts.append(document_text(raw))
            slots.append(len(results))
            results.append("")
        except ValueError as e:
            results.append(str(e))
    if texts:
        for slot, enc in zip(slots, tokenizer.encode_batch(texts), strict=True):
            ids = np.empty(len(enc.ids) + 1, np.int32)  # (1 + n,)
            ids[0] = GPT2_EOS  # EOS doubles as BOS: it opens every document
            ids[1:] = enc.ids
            results[slot] = ids
    return results
