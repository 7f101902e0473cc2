"""Where files live: a local path or an object-store URL (`s3://`, `gs://`), one set of operations.

    root = resolve("s3://bucket/run")            # or "runs/demo": an absolute local Path
    write_text(root / "config.json", text)       # a local file is replaced atomically
    read_text(root / "summary.json"); exists(...); is_dir(...); listdir(root / "data_state")
    move(root / "checkpoints" / "8", root / "checkpoints_damaged" / "8.1" / "checkpoint")
    with open_read("gs://bucket/shards/00001.tar") as stream: ...

Every function takes a local path (str or `os.PathLike`) or a URL and does the same thing on
both. `resolve` gives a local path as an absolute `pathlib.Path` and a URL as an
`etils.epath.Path` (the path type Orbax takes), so `/` joins either. Local paths go straight to
the operating system, as before; URLs go through fsspec (`s3fs`, `gcsfs`: the `cloud` extra),
which reads the standard configuration: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an S3-compatible server, `AWS_REGION`; Google's
application default credentials for `gs://`. Orbax's arrays (TensorStore) are configured from
the same variables by `m3ae.orbax_storage`.

Object stores have objects, not folders: `makedirs` does nothing there, a "folder" exists once
an object lies under it, and `move` of a folder copies then deletes (not atomic, so callers
use it only for what is never read half-moved). A write is one PUT: readers see the old object
or the new one, never a part. fsspec's listing cache is switched off (TensorStore and other
processes write behind its back), unless the user configured it.

`etils.epath` (Orbax's paths) sends `s3://` and `gs://` through TensorFlow's `gfile` whenever
TensorFlow is installed, as it is with the `tf` extra; TensorFlow has had no S3 file system since
2.6 ("File system scheme 's3' not implemented") and knows nothing of the settings above. So
importing this module sets `EPATH_USE_TF=false` unless the user set it: every epath goes through
fsspec like the rest (`tests/test_object_storage.py` runs with TensorFlow installed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

# Before any etils.epath call: epath decides once per process (cached) whether to use TF.
os.environ.setdefault("EPATH_USE_TF", "false")

# URL schemes read through fsspec; anything else with "://" (http, pipe:) is not ours.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs")
_EXTRA = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}


def scheme(path: str | os.PathLike) -> str | None:
    """`"s3"`, `"gs"` or `"gcs"` for an object-store URL, else None."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in OBJECT_STORE_SCHEMES else None


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is an object-store URL (`s3://`, `gs://`, `gcs://`)."""
    return scheme(path) is not None


def resolve(path: str | os.PathLike) -> Any:
    """A local path as an absolute `Path` (`~` expanded); a URL as an `etils.epath.Path`,
    without a trailing slash (`s3://bucket/run/` -> `s3://bucket/run`)."""
    if not is_url(path):
        return Path(path).expanduser().absolute()
    from etils import epath

    kind = scheme(path)
    rest = os.fspath(path).split("://", 1)[1].strip("/")
    if not rest:
        raise ValueError(f"{path}: an object-store URL needs a bucket, e.g. {kind}://bucket/run")
    _configure(kind)
    return epath.Path(f"{'gs' if kind == 'gcs' else kind}://{rest}")


def filesystem(url: str | os.PathLike) -> Any:
    """The fsspec filesystem of an object-store URL (ImportError in one line without it)."""
    kind = scheme(url)
    if kind is None:
        raise ValueError(f"{os.fspath(url)} is not an s3:// or gs:// URL")
    _configure(kind)
    import fsspec

    try:
        return fsspec.filesystem(kind)
    except ImportError as e:
        raise ImportError(
            f"{os.fspath(url)}: {kind}:// needs {_EXTRA[kind]}: pip install 'm3ae[cloud]'"
        ) from e


def _configure(kind: str) -> None:
    """Switch fsspec's listing cache off for `kind` (once; a user's own setting wins)."""
    import fsspec.config

    fsspec.config.conf.setdefault(kind, {}).setdefault("use_listings_cache", False)


# ------------------------------------------------------------------------------- questions
def exists(path: str | os.PathLike) -> bool:
    if is_url(path):
        return filesystem(path).exists(os.fspath(path))
    return os.path.exists(path)


def is_file(path: str | os.PathLike) -> bool:
    if is_url(path):
        return filesystem(path).isfile(os.fspath(path))
    return os.path.isfile(path)


def is_dir(path: str | os.PathLike) -> bool:
    """A local directory, or a URL with at least one object under it."""
    if is_url(path):
        return filesystem(path).isdir(os.fspath(path))
    return os.path.isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names (not paths) directly under `path`, sorted; [] when there is nothing."""
    if is_url(path):
        fs = filesystem(path)
        try:
            entries = fs.ls(os.fspath(path), detail=False)
        except FileNotFoundError:
            return []
        prefix = _bare(path)
        return sorted(
            {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != prefix}
        )
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern (`*`, `?`, `[...]`), sorted; URLs keep their scheme."""
    if is_url(pattern):
        kind = pattern.split("://", 1)[0]
        return sorted(f"{kind}://{p}" for p in filesystem(pattern).glob(pattern))
    import glob as _glob

    return sorted(_glob.glob(pattern))


def _bare(url: str | os.PathLike) -> str:
    """A URL as fsspec lists it: without the scheme and trailing slash."""
    return os.fspath(url).split("://", 1)[1].rstrip("/")


# ------------------------------------------------------------------------- reading, writing
def read_bytes(path: str | os.PathLike) -> bytes:
    if is_url(path):
        return filesystem(path).cat_file(os.fspath(path))
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` whole: locally through a temporary file renamed over `path` (parents
    created), on an object store as one PUT. A reader sees the old content or the new."""
    if is_url(path):
        filesystem(path).pipe_file(os.fspath(path), data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A binary stream of the file, read ahead in blocks on an object store."""
    if is_url(path):
        fs = filesystem(path)
        return fs.open(os.fspath(path), "rb", block_size=8 << 20, cache_type="readahead")
    return open(path, "rb")


# --------------------------------------------------------------------------------- folders
def makedirs(path: str | os.PathLike) -> None:
    """Create the folder and its parents locally; nothing to do on an object store."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a file or folder: a rename locally (dst's parent created), copy + delete on an
    object store (both must be on the same one)."""
    if is_url(src) != is_url(dst):
        raise ValueError(f"cannot move {os.fspath(src)} to {os.fspath(dst)}: another storage")
    if is_url(src):
        # Object by object: fsspec's recursive mv also tries to copy the "folders" themselves.
        fs = filesystem(src)
        base, target = _bare(src), _bare(dst)
        keys = fs.find(os.fspath(src))
        if not keys:
            raise FileNotFoundError(f"nothing to move at {os.fspath(src)}")
        for key in keys:
            rel = key[len(base) :].lstrip("/")
            fs.cp_file(key, f"{target}/{rel}" if rel else target)
        fs.rm(keys)
        return
    os.makedirs(os.path.dirname(os.fspath(dst)) or ".", exist_ok=True)
    os.rename(src, dst)


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a whole folder; nothing happens when it does not exist."""
    if is_url(path):
        fs = filesystem(path)
        try:
            fs.rm(os.fspath(path), recursive=True)
        except FileNotFoundError:
            pass
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def upload(local_dir: str | os.PathLike, path: str | os.PathLike, last: str = "") -> None:
    """Copy a local folder's files to `path` (replacing what was there), local or URL. The
    file named `last` (relative to the folder) is copied last: when it is there, all are."""
    remove(path)
    if not is_url(path):
        shutil.copytree(local_dir, path)
        return
    fs = filesystem(path)
    files = sorted(
        os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
        for root, _, names in os.walk(local_dir)
        for name in names
    )
    for rel in sorted(files, key=lambda rel: rel == last):
        fs.put_file(os.path.join(local_dir, rel), f"{os.fspath(path)}/{rel}")


def download(path: str | os.PathLike, local_dir: str | os.PathLike | None = None) -> Path:
    """A local copy of the folder at `path` (into `local_dir`, else a new temporary folder);
    a local `path` is returned as it is."""
    if not is_url(path):
        return Path(path)
    out = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="m3ae-"))
    fs = filesystem(path)
    base = _bare(path)
    found = fs.find(os.fspath(path))
    if not found:
        raise FileNotFoundError(f"nothing under {os.fspath(path)}")
    for key in found:
        rel = key[len(base) :].lstrip("/")
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    return out
