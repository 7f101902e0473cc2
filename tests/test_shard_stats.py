"""`m3ae shards` writes img2dataset's per-shard files (pipelines/shard_stats.py): each
`NNNNN_stats.json` with img2dataset's fields and meanings, and each `NNNNN.parquet`, on real
tar shards with real skips."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter

import pyarrow.parquet as pq
from test_shard_writer import ROWS, _folder, _read  # the writer tests' picture folder

from pipelines.shard_writer import folder_records, write_shards

# img2dataset's per-shard stats, as img2dataset/logger.py `write_stats` writes them
# (rom1504/img2dataset@95523bc7579745a1749b8132d408b9fea89a338e), with the types of its values:
#     stats = {"count": count, "successes": successes, "failed_to_download": failed_to_download,
#              "failed_to_resize": failed_to_resize, "duration": end_time - start_time,
#              "start_time": start_time, "end_time": end_time, "status_dict": status_dict.dump()}
IMG2DATASET_STATS = {
    "count": int,
    "successes": int,
    "failed_to_download": int,
    "failed_to_resize": int,
    "duration": float,
    "start_time": float,  # time.time()
    "end_time": float,
    "status_dict": dict,  # CappedCounter.dump(): {"success": n, error: n, ...}
}
OUR_STATS = {"shard": str, "bytes": int, "skipped_examples": list}  # beside them, ours
# The KEY.json (and NNNNN.parquet row) keys of img2dataset's README ("Also .json files named
# 0.json, 1.json,... are saved with these keys") that apply to files read from disk: no
# original_width/original_height (a rasterised SVG has none), exif or sha256.
IMG2DATASET_SAMPLE = ("url", "caption", "key", "status", "error_message", "width", "height")


def test_per_shard_files_match_img2dataset(tmp_path):
    """Real skips of both img2dataset kinds (a missing file: failed_to_download; a truncated
    JPEG: failed_to_resize) and one of neither (an empty caption), over two shards."""
    images = _folder(tmp_path)
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["filename", "caption", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    out = tmp_path / "out"
    before = time.time()
    records = folder_records(images, captions, workers=1)
    summary = write_shards(records, out, samples_per_shard=1, progress=False)
    after = time.time()
    # What img2dataset's LoggerProcess does with each stats file: the shard id from the name,
    # then these fields (a file it cannot read is an error there).
    stats = {}
    for path in sorted(out.glob("*_stats.json")):
        shard_id = int(path.name.split("_")[0])
        stats[shard_id] = s = json.loads(path.read_text())
        assert set(s) == set(IMG2DATASET_STATS) | set(OUR_STATS)
        for key, kind in {**IMG2DATASET_STATS, **OUR_STATS}.items():
            assert isinstance(s[key], kind), (key, s[key])
        assert Counter(s["status_dict"])["success"] == s["successes"]
        assert before <= s["start_time"] <= s["end_time"] <= after
        assert s["duration"] == s["end_time"] - s["start_time"]
        assert s["shard"] == f"{shard_id:05d}.tar"
        assert s["bytes"] == (out / s["shard"]).stat().st_size
    # Shard 0 holds the red square and the three skips after it; shard 1 the grey picture.
    fields = ("count", "successes", "failed_to_download", "failed_to_resize")
    assert [tuple(stats[i][k] for k in fields) for i in (0, 1)] == [(4, 1, 1, 1), (1, 1, 0, 0)]
    assert stats[0]["status_dict"] == {
        "empty_caption": 1, "missing_file": 1, "success": 1, "truncated": 1
    }  # fmt: skip
    assert summary["shard_stats"] == [stats[0], stats[1]]
    assert sum(s["count"] for s in stats.values()) == summary["attempted"] == 5

    # NNNNN.parquet: a row per entry, a written sample's being its KEY.json.
    files = {k: v for _, _, f in _read(out) for k, v in f.items()}
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [
        ("sub--red", "success"),
        ("missing", "failed_to_download"),
        ("corrupt", "failed_to_resize"),
        ("grey", "skipped"),
    ]
    sample = json.loads(files["sub--red.json"])
    assert rows[0] == sample and set(IMG2DATASET_SAMPLE) <= set(sample)
    assert (sample["status"], sample["error_message"]) == ("success", None)
    assert rows[1]["error_message"].startswith("missing_file: ") and rows[1]["caption"] is None
    table = pq.read_table(out / "00001.parquet")
    assert table.to_pylist() == [json.loads(files["grey-1.json"])]
    types = {f.name: str(f.type) for f in table.schema}
    assert (types["width"], types["height"], types["cls"], types["url"]) == (
        "int32",
        "int32",
        "int64",
        "string",
    )
