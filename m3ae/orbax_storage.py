"""Orbax checkpoints (TensorStore arrays) in a local folder or on `s3://` / `gs://`.

    directory = orbax_directory("s3://bucket/run/checkpoints")   # an etils path Orbax accepts
    ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        **orbax_options(directory), ...))

Orbax reads and writes its metadata files through `etils.epath` (fsspec: `s3fs`, `gcsfs`) and
the arrays through TensorStore kvstores that it builds itself from the directory. For `gs://` it
builds TensorStore's `gcs` driver; for `s3://` the installed Orbax (0.12) builds nothing and
fails with "Checkpoint path should be absolute". `orbax_directory` therefore installs, once per
process, a wrapper around Orbax's one kvstore builder (`tensorstore_utils.build_kvstore_tspec`)
that builds an `s3://` directory exactly as the equivalent `gs://` one and then swaps each `gcs`
kvstore of the result for TensorStore's `s3` driver, configured from the standard AWS variables:

- `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`: the `endpoint` (an S3-compatible server such as
  MinIO, or the tests' moto server on 127.0.0.1); TensorStore does not read these itself;
- `AWS_REGION` or `AWS_DEFAULT_REGION`: `aws_region` (else TensorStore asks the bucket);
- `AWS_ACCESS_KEY_ID` set: credentials from the environment; else TensorStore's default chain
  (profile files, instance metadata).

On object storage there is no atomic rename of a folder, so a step is committed as Orbax does on
GCS: written in place, then a `commit_success.txt` marks it complete (`orbax_options`); a step
without it is not listed, so a process killed mid-save leaves the previous step as the latest.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from pipelines.storage import is_url, resolve

_installed = False
_lock = threading.Lock()


def orbax_directory(path: str | os.PathLike) -> Any:
    """`path` as Orbax wants it: an absolute `Path` locally, an `etils.epath.Path` for a URL
    (the `s3://` adapter installed)."""
    target = resolve(path)
    if not is_url(target):
        return Path(target)
    from etils import epath

    if str(target).startswith("s3://"):
        _install_s3_kvstores()
    return epath.Path(str(target))


def orbax_options(path: str | os.PathLike) -> dict[str, Any]:
    """Options for a `CheckpointManagerOptions` / checkpointer of `path`: on object storage,
    steps committed by a `commit_success.txt` file instead of a folder rename."""
    if not is_url(path):
        return {}
    from orbax.checkpoint import options

    return {"atomicity_options": options.AtomicityOptions(mode=options.AtomicityMode.COMMIT_FILE)}


def s3_kvstore(bucket: str, path: str) -> dict[str, Any]:
    """TensorStore's `s3` kvstore spec for `bucket`/`path`, from the AWS environment variables."""
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def _install_s3_kvstores() -> None:
    """Wrap Orbax's kvstore builder so that `s3://` directories get TensorStore's s3 driver."""
    global _installed
    with _lock:
        if _installed:
            return
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        original = getattr(ts_utils, "build_kvstore_tspec", None)
        if original is None:
            raise ImportError(
                "this orbax-checkpoint has no tensorstore_utils.build_kvstore_tspec: m3ae cannot "
                "write s3:// checkpoints with it (pin orbax-checkpoint 0.12)"
            )

        def build_kvstore_tspec(directory, name=None, **kwargs):
            text = os.fspath(directory)
            if not text.startswith("s3://"):
                return original(directory, name, **kwargs)
            return _gcs_to_s3(original("gs://" + text[len("s3://") :], name, **kwargs))

        build_kvstore_tspec.__wrapped__ = original  # type: ignore[attr-defined]
        ts_utils.build_kvstore_tspec = build_kvstore_tspec
        _installed = True


def _gcs_to_s3(spec: Any) -> Any:
    """`spec` with every `gcs` / `gcs_grpc` kvstore (bucket, path) made an `s3` one."""
    if isinstance(spec, list):
        return [_gcs_to_s3(item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if spec.get("driver") in ("gcs", "gcs_grpc"):
        rest = {k: v for k, v in spec.items() if k not in ("driver", "bucket", "path")}
        return {**s3_kvstore(spec["bucket"], spec.get("path", "")), **rest}
    return {key: _gcs_to_s3(value) for key, value in spec.items()}
