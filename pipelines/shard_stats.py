"""img2dataset's per-shard files, as `m3ae shards` writes them beside each ``NNNNN.tar``.

Matched against rom1504/img2dataset@95523bc7579745a1749b8132d408b9fea89a338e:
img2dataset/logger.py (`write_stats`, and `LoggerProcess`, which reads the files back) and
img2dataset/writer.py (`WebDatasetSampleWriter`, `BufferedParquetWriter`).

``NNNNN_stats.json``: img2dataset's fields with their meanings,

    count               entries this shard took in (successes + every skip counted in it)
    successes           samples written to the tar
    failed_to_download  entries whose source could not be read (`FAILED_TO_DOWNLOAD`)
    failed_to_resize    entries whose image could not be decoded, rendered or encoded
                        (`FAILED_TO_RESIZE`; img2dataset counts decode errors here too)
    duration            end_time - start_time, seconds
    start_time          when the shard was opened, and end_time when its stats were final
                        (time.time(), seconds since the epoch)
    status_dict         {"success": successes, reason: n, ...} (img2dataset's counter of
                        statuses; ours are the short skip reasons, e.g. "missing_file")

plus three of ours: ``shard`` (the tar's file name), ``bytes`` (its size) and
``skipped_examples`` (up to 100 skipped entries: key, reason, detail). A skip of neither
img2dataset kind (a duplicate or malformed key, an empty caption, a bad row) is in `count` and
`status_dict` only, as img2dataset counts an entry that raised, so count >= successes +
failed_to_download + failed_to_resize.

``NNNNN.parquet``: one row per entry of the shard, in input order: a written sample's row is
its ``KEY.json``; a skipped entry's has its `key`, `status` ("failed_to_download",
"failed_to_resize", or ours: "skipped") and `error_message` ("reason: detail"), the other
columns null.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

FAILED_TO_DOWNLOAD = frozenset({"missing_file", "unreadable_text"})
FAILED_TO_RESIZE = frozenset(
    {
        "empty",
        "undecodable",
        "truncated",
        "too_large",
        "unreadable_image",
        "unparseable_svg",
        "render_error",
        "encode_error",
    }
)
# Typed even when a shard holds no value of them (other columns: as pyarrow infers).
STRING_COLUMNS = ("key", "caption", "url", "status", "error_message", "label", "source", "title")


def status(reason: str) -> str:
    """img2dataset's status of an entry skipped for `reason`."""
    if reason in FAILED_TO_DOWNLOAD:
        return "failed_to_download"
    return "failed_to_resize" if reason in FAILED_TO_RESIZE else "skipped"


def shard_stats(successes: int, skipped: Counter, start_time: float, end_time: float) -> dict:
    """The img2dataset fields of one shard (module docstring), in `write_stats`'s order."""
    counts = Counter({"success": successes}) + skipped  # `+` drops zero counts, as a Counter
    return {
        "count": successes + sum(skipped.values()),
        "successes": successes,
        "failed_to_download": sum(n for r, n in skipped.items() if r in FAILED_TO_DOWNLOAD),
        "failed_to_resize": sum(n for r, n in skipped.items() if r in FAILED_TO_RESIZE),
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": dict(sorted(counts.items())),
    }


def skipped_by_reason(stats: dict[str, Any]) -> dict[str, int]:
    """The skip counts of one shard's stats (a `status_dict` without "success")."""
    return {r: n for r, n in stats["status_dict"].items() if r != "success"}


def skip_row(key: str, reason: str, detail: str = "") -> dict[str, Any]:
    """The parquet row of a skipped entry."""
    message = f"{reason}: {detail}" if detail else reason
    return {"key": key, "status": status(reason), "error_message": message}


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as a parquet table (every key a column, null where absent; the columns of a
    written sample's ``KEY.json`` first, in its order), written under a temporary name and
    renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = pa.int32()  # img2dataset's type of width and height
    types = {"cls": pa.int64(), "width": size, "height": size}
    types |= {c: pa.string() for c in STRING_COLUMNS}
    written = [k for row in rows if row.get("status") == "success" for k in row]
    columns = list(dict.fromkeys(written + [k for row in rows for k in row])) or ["key", "status"]
    table = pa.table({c: pa.array([row.get(c) for row in rows], types.get(c)) for c in columns})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
