"""Checks of a training config against the inputs and the mesh, before anything is compiled.

    check_inputs(config, mesh)   # raises ValueError / FileNotFoundError, one line each

A mistake found here costs a second; found by the training loop it costs a compile or, for a
shard list that cannot be read, a run that never takes a step. Checked, each error naming the
config key and the value:
- every configured url set (training streams, `data.val_urls`, `eval.probe_urls`, the LM's
  `data.urls`) expands to shards that exist (local files and `s3://` / `gs://` objects, one
  listing per prefix) or whose first shard opens (other remote URLs);
- each stream's share of the global batch splits evenly over the processes and over the
  devices that hold the batch (mesh `data` x `fsdp`);
- the image size is a multiple of the patch size;
- a validation set holds at least one batch (else the validation loss would silently be absent).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from pipelines.shards import (
    TEXT_FILE_SUFFIXES,
    check_shards,
    expand_urls,
    is_remote,
    shard_keys,
)

STREAMS = ("paired", "image_only", "text_only")
VAL_HOOKS = ("val_loss", "crossmodal")


def url_sets(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """`config key -> shard urls` of every url set the run will read."""
    from pipelines.text_documents import expand_text_urls

    data, out = config.data, {}
    text = "urls" in data  # the LM's data config: one text url set (tars, JSONL, .txt)
    expand = expand_text_urls if text else expand_urls
    specs = {"data.urls": data.get("urls", "")} if text else {}
    for name in STREAMS if has_streams(data) else ():
        if data[name].urls and float(data[name].weight) > 0:
            specs[f"data.{name}.urls"] = data[name].urls
    specs["data.val_urls"] = data.get("val_urls", "")
    if "eval" in config:
        specs["eval.probe_urls"] = config.eval.get("probe_urls", "")
    for key, spec in specs.items():
        if not spec:
            continue
        try:
            out[key] = expand(spec)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{key}={spec!r}: {e}") from e
    return out


def has_streams(data: Any) -> bool:
    """An M3AE data config (paired / image-only / text-only streams), not the LM's."""
    return all(name in data for name in STREAMS)


def check_inputs(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """Raise one clear error for the first problem of `config` with its inputs and `mesh`."""
    import jax

    for key, urls in url_sets(config).items():
        check_shards(urls, key)
    data, batch = config.data, int(config.optim.batch_size)
    holders = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    if has_streams(data):
        from pipelines.mix import split_batch

        weights = {n: float(data[n].weight) if data[n].urls else 0.0 for n in STREAMS}
        per_host = split_batch(batch, weights, jax.process_count())
        for name, size in per_host.items():
            share = size * jax.process_count()
            if share % holders:
                raise ValueError(
                    f"optim.batch_size={batch}: stream {name!r} gets {share} samples per step, "
                    f"which does not split over the {holders} devices of mesh data x fsdp "
                    f"({dict(mesh.shape)}); use a batch size that is a multiple of {holders}"
                )
        check_patches(config)
    elif batch % holders:
        raise ValueError(
            f"optim.batch_size={batch} does not split over the {holders} devices of mesh "
            f"data x fsdp ({dict(mesh.shape)})"
        )
    check_val_size(config)


def check_patches(config: ml_collections.ConfigDict) -> None:
    size, patch = int(config.data.image_size), int(config.model.get("patch_size", 0) or 0)
    if size < 1:
        raise ValueError(f"data.image_size must be >= 1, got {size}")
    if patch and size % patch:
        raise ValueError(
            f"data.image_size={size} is not a multiple of model.patch_size={patch}: the "
            "image would not cut into whole patches"
        )


def check_val_size(config: ml_collections.ConfigDict) -> None:
    """A local val set of image shards smaller than one batch gives no validation batch at all."""
    data = config.data
    spec = data.get("val_urls", "")
    hooks = tuple(config.get("eval", {}).get("hooks", ()))
    if not spec or not has_streams(data) or not set(hooks) & set(VAL_HOOKS):
        return
    urls = expand_urls(spec)
    if any(is_remote(u) or u.lower().endswith(TEXT_FILE_SUFFIXES) for u in urls):
        return  # no cheap count: the tar headers of local shards only
    batch = int(config.optim.batch_size)
    count = 0
    for url in urls:
        count += len(shard_keys(url))
        if count >= batch:
            return
    raise ValueError(
        f"data.val_urls={spec!r} holds {count} samples, fewer than one batch of "
        f"optim.batch_size={batch}: the validation hooks {hooks} would have nothing to score; "
        "use a larger val set or clear data.val_urls"
    )
