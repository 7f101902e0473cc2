"""Import parameters of the original M3AE code (young-geng/m3ae_public) into our layout.

Sources: `.npz` exports (`param/<flax path>` arrays and a `meta/config` JSON string, as in the
parity fixtures) and the original training script's release checkpoints, a cloudpickle of
`{"step", "epoch", "variant", "state"}` whose `state` is a flax TrainState holding
`params = {"params": {...}}` next to optax functions pickled *by value* (code objects, closures).

A normal `pickle.load` of such a file imports modules and builds and calls code from it, so
release pickles are read only through `pipelines.safe_pickle.safe_load_pickle`, which imports and
calls nothing named in the file (see its module docstring for the threat model).

Every problem with a file is a ValueError of one line that starts with the file's name: a pickle
the safe loader refuses (EXT opcodes, object arrays, ...) or cannot parse, an npz holding object
arrays (never unpickled) or a bad `meta/config`, and a malformed value among the flags/config
that `infer_config` reads (`ref.pkl: flag m3ae.num_heads='twelve' is not an integer; pass
--num-heads`). `read_reference` records the file in `meta["_file"]` for those messages.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.safe_pickle import safe_load_pickle, to_plain


# ------------------------------------------------------------------------------- reading files
def _plain_value(v: Any) -> Any:
    if isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain_value(x) for x in v]
    return v if v is None or isinstance(v, str | int | float | bool) else repr(v)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, Mapping) else {prefix + k: v})
    return flat


def _looks_like_m3ae(tree: Any) -> bool:
    return isinstance(tree, dict) and "cls_token" in tree and isinstance(tree.get("encoder"), dict)


def _find_param_tree(plain: Any) -> dict | None:
    state = plain.get("state") if isinstance(plain, dict) else None
    params = state.get("params") if isinstance(state, dict) else None
    if isinstance(params, dict) and _looks_like_m3ae(params.get("params")):
        return params["params"]
    # Breadth first, so the shallowest match wins (optimizer moments mirror the tree deeper down).
    queue, seen = deque([plain]), set()
    while queue:
        node = queue.popleft()
        if id(node) in seen or not isinstance(node, dict | list | tuple):
            continue
        seen.add(id(node))
        if _looks_like_m3ae(node):
            return node
        queue.extend(node.values() if isinstance(node, dict) else node)
    return None


def read_reference(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read an original M3AE `.npz` export or release pickle into `(flat params, meta)`.

    Keys are the original's Flax paths (`encoder/Block_0/Attention_0/Dense_0/kernel`), values
    float32 arrays. Meta is the npz `meta/config` JSON, or the pickle's step, epoch and variant.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        raw, meta = _read_npz(name)
        if not raw:
            raise ValueError(f"{name}: no 'param/<path>' arrays, so no M3AE parameters")
    else:
        plain = to_plain(safe_load_pickle(name))
        tree = _find_param_tree(plain)
        if tree is None:
            raise ValueError(
                f"{name}: no M3AE parameter tree (neither state.params['params'] nor any dict "
                "with 'cls_token' and 'encoder')"
            )
        raw = _flatten(tree)
        keys = ("step", "epoch", "variant")
        meta = {k: _plain_value(plain[k]) for k in keys if isinstance(plain, dict) and k in plain}
    if "cls_token" not in raw or not any(k.startswith("encoder/") for k in raw):
        raise ValueError(f"{name}: not an M3AE parameter tree (no cls_token or encoder/...)")
    for key, value in raw.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise ValueError(f"{name}: parameter {key} is not a numeric array: {value!r:.80}")
    return {k: v.astype(np.float32, copy=False) for k, v in raw.items()}, {**meta, "_file": name}


def _read_npz(name: str) -> tuple[dict[str, np.ndarray], dict]:
    """`param/<path>` arrays and the `meta/config` JSON of an npz; object arrays are refused."""

    def array(z: Any, key: str) -> np.ndarray:
        try:
            return z[key]
        except ValueError as e:  # allow_pickle=False: an object array would need unpickling
            if "allow_pickle" in str(e) or "Object arrays" in str(e):
                raise ValueError(
                    f"{name}: array {key!r} is refused: an object array (dtype=object) is "
                    "never unpickled; only numeric arrays are read"
                ) from e
            raise ValueError(f"{name}: array {key!r} is not readable: {e}") from e

    try:
        with np.load(name, allow_pickle=False) as z:
            raw = {k[len("param/") :]: array(z, k) for k in z.files if k.startswith("param/")}
            config = array(z, "meta/config") if "meta/config" in z.files else None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{name}: not a readable .npz ({type(e).__name__}: {e})") from e
    if config is None:
        return raw, {}
    text = config.reshape(-1)[0] if config.size == 1 and config.dtype.kind in "SU" else None
    try:
        meta = json.loads(text.decode() if isinstance(text, bytes) else str(text))
    except (ValueError, UnicodeDecodeError):
        meta = None
    if text is None or not isinstance(meta, dict):
        raise ValueError(f"{name}: meta/config is not one JSON object string ({config!r:.60})")
    return raw, meta


# ------------------------------------------------------------------------------------- mapping
_TOP = {  # ours -> original
    "cls_token": "cls_token", "text_embed/embedding": "text_embedding/embedding",
    "enc_image_type": "encoder_image_type_embedding",
    "enc_text_type": "encoder_text_type_embedding",
    "dec_image_type": "decoder_image_type_embedding",
    "dec_text_type": "decoder_text_type_embedding",
    "image_mask_token": "image_mask_embedding", "text_mask_token": "text_mask_embedding",
}  # fmt: skip
for _ours, _orig in (("image_embed", "image_embedding"), ("dec_proj", "decoder_input_projection"),
                     ("image_head", "decoder_image_output/Dense_0"),
                     ("text_head", "decoder_text_output/Dense_0")):  # fmt: skip
    _TOP.update({f"{_ours}/{p}": f"{_orig}/{p}" for p in ("kernel", "bias")})
_BLOCK = {  # ours -> original, under {encoder,decoder}/block_i and .../Block_i
    "ln_attn": "LayerNorm_0", "attn/qkv": "Attention_0/Dense_0", "attn/out": "Attention_0/Dense_1",
    "ln_mlp": "LayerNorm_1", "mlp/fc1": "TransformerMLP_0/fc1", "mlp/fc2": "TransformerMLP_0/fc2",
}  # fmt: skip


def _num_blocks(flat: Mapping[str, Any], stack: str) -> int:
    ids = {int(m.group(1)) for k in flat if (m := re.match(rf"{stack}/Block_(\d+)/", k))}
    return max(ids) + 1 if ids else 0


def _pairs(flat: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs = list(_TOP.items())
    for st in ("encoder", "decoder"):
        modules = [(f"{st}/ln_final", f"{st}/LayerNorm_0")]
        for i in range(_num_blocks(flat, st)):
            modules += [(f"{st}/block_{i}/{k}", f"{st}/Block_{i}/{v}") for k, v in _BLOCK.items()]
        for ours, orig in modules:
            names = ("scale", "bias") if "ln_" in ours else ("kernel", "bias")
            pairs += [(f"{ours}/{p}", f"{orig}/{p}") for p in names]
    return pairs


def to_m3ae_params(flat_orig: Mapping[str, np.ndarray]) -> dict:
    """Map original flat parameters onto our nested tree, using every tensor exactly once.

    The fused qkv kernel has the same q | k | v column layout in both, so it is copied as is.
    """
    deep = sorted(k for k in flat_orig if re.match(r"decoder_(image|text)_output/(?!Dense_0/)", k))
    if deep:
        raise ValueError(
            f"the original has MLP output heads (output_head_depth > 0: {', '.join(deep[:4])}); "
            "only the default single-Dense heads are supported"
        )
    no_types = [v for k, v in _TOP.items() if k.endswith("_type") and v not in flat_orig]
    if no_types:
        raise ValueError(
            "the original was trained without type embeddings (use_type_embedding=False: "
            f"missing {', '.join(no_types)}); only models with them are supported"
        )
    if not (_num_blocks(flat_orig, "encoder") and _num_blocks(flat_orig, "decoder")):
        raise ValueError("no encoder/Block_i or decoder/Block_i parameters found")
    pending, tree, missing = dict(flat_orig), {}, []
    for ours, orig in _pairs(flat_orig):
        if orig not in pending:
            missing.append(orig)
            continue
        *parents, leaf = ours.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(pending.pop(orig))
    if missing or pending:
        raise ValueError(
            "the original parameters do not match the M3AE layout: "
            f"missing {sorted(missing) or 'none'}; unexpected {sorted(pending) or 'none'}"
        )
    return tree


# -------------------------------------------------------------------------------------- config
# The original's get_transformer_by_config: model_type -> (emb_dim, heads, dec_emb_dim, heads).
_SIZES = {"small": (384, 6, 512, 16), "base": (768, 12, 512, 16),
          "large": (1024, 16, 512, 16), "huge": (1280, 16, 512, 16)}  # fmt: skip
_EXTRAS = {  # our config key -> names in the npz meta or the flattened release flags
    "image_size": ("image_size",), "text_length": ("text_length", "tokenizer_max_length"),
    **{k: (k,) for k in ("image_loss_weight", "text_loss_weight")},
    **{k: (k,) for k in ("image_mask_ratio", "text_mask_ratio")},
    **{k: (k,) for k in ("unpaired_text_loss_weight", "image_all_token_loss")},
    "text_all_token_loss": ("text_all_token_loss",),
}  # fmt: skip


# Our config key -> (parse, what a valid value is); a value failing it stops the import.
_FLAG_KINDS = {
    "image_size": ("int", "a positive integer"), "text_length": ("int", "a positive integer"),
    "patch_size": ("int", "a positive integer"),
    "image_loss_weight": ("float", "a number >= 0"), "text_loss_weight": ("float", "a number >= 0"),
    "image_mask_ratio": ("ratio", "a number in [0, 1)"),
    "text_mask_ratio": ("ratio", "a number in [0, 1)"),
    "unpaired_text_loss_weight": ("float", "a number >= 0"),
    "image_all_token_loss": ("bool", "true or false"),
    "text_all_token_loss": ("bool", "true or false"),
}  # fmt: skip


def _meta_get(meta: Mapping[str, Any], *names: str) -> tuple[str | None, Any]:
    """`(flag name as found, value)` of the first of `names` set in meta, else `(None, None)`."""
    # npz meta uses bare names; the release `variant` holds flattened flags ("m3ae.x", "data.x").
    scopes = [meta] + ([meta["variant"]] if isinstance(meta.get("variant"), Mapping) else [])
    keys = [k for n in names for k in (n, f"m3ae.{n}", f"data.{n}")]
    found = ((k, s[k]) for s in scopes for k in keys if s.get(k) not in (None, ""))
    return next(found, (None, None))


def _as_int(value: Any) -> int | None:
    """An integer flag: an int, an integral float or a string of digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str | np.number):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    text = str(value).strip().lower()
    return {"true": True, "1": True, "false": False, "0": False}.get(text)


def _flag(meta: Mapping[str, Any], key: str, *names: str) -> Any:
    """The parsed value of flag `key` (found under `names`), None if absent; malformed: error."""
    found, value = _meta_get(meta, *(names or (key,)))
    if found is None:
        return None
    parse, expected = _FLAG_KINDS[key]
    if parse == "bool":
        if (flag := _as_bool(value)) is None:
            raise ValueError(f"{_where(meta)}flag {found}={value!r:.60} is not {expected}")
        return flag
    number = _as_int(value) if parse == "int" else _as_float(value)
    ok = number is not None and (number > 0 if parse == "int" else number >= 0)
    if not ok or (parse == "ratio" and number >= 1):
        raise ValueError(f"{_where(meta)}flag {found}={value!r:.60} is not {expected}")
    return number


def _where(meta: Mapping[str, Any]) -> str:
    return f"{meta['_file']}: " if isinstance(meta.get("_file"), str) else ""


def _heads(width: int, dec: bool, meta: Mapping[str, Any]) -> int | None:
    model_type = _meta_get(meta, "model_type")[1]  # in the original it overrides explicit flags
    size = _SIZES.get(model_type) if isinstance(model_type, str) else None
    if size is not None and size[2 * dec] == width:
        return size[2 * dec + 1]
    name = "dec_num_heads" if dec else "num_heads"
    found, explicit = _meta_get(meta, name)
    if found is not None:
        heads, option = _as_int(explicit), "--" + name.replace("_", "-")
        if heads is None:
            raise ValueError(
                f"{_where(meta)}flag {found}={explicit!r:.60} is not an integer; pass {option}"
            )
        if heads <= 0 or width % heads:
            raise ValueError(
                f"{_where(meta)}flag {found}={explicit!r:.60} cannot split width {width} into "
                f"heads (expected a positive divisor of {width}); pass {option}"
            )
        return heads
    return next((s[2 * dec + 1] for s in _SIZES.values() if s[2 * dec] == width), None)


def infer_config(
    flat_orig: Mapping[str, np.ndarray],
    meta: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Our model kwargs: widths, depths, vocab and patch from shapes; heads and the rest from
    meta (or the original's size table); `overrides` win over everything. A malformed flag
    that is used (not overridden) raises a ValueError naming the file, the flag and its value."""
    meta, overrides = meta or {}, dict(overrides or {})

    def dims(key: str) -> tuple[int, ...]:
        if key not in flat_orig:
            raise ValueError(f"{_where(meta)}cannot infer the config: missing parameter {key}")
        return tuple(flat_orig[key].shape)

    patch_dim, emb = dims("image_embedding/kernel")
    dec_emb = dims("decoder_input_projection/kernel")[1]
    hidden = dims("encoder/Block_0/TransformerMLP_0/fc1/kernel")[1]
    dec_hidden = dims("decoder/Block_0/TransformerMLP_0/fc1/kernel")[1]
    if hidden % emb or dec_hidden % dec_emb or hidden // emb != dec_hidden // dec_emb:
        raise ValueError(f"MLP widths {hidden}/{emb}, {dec_hidden}/{dec_emb}: no common ratio")
    patch = math.isqrt(patch_dim // 3)
    if patch * patch * 3 != patch_dim:
        raise ValueError(f"{_where(meta)}image embedding input {patch_dim} is not an RGB patch")
    if (flag := _flag(meta, "patch_size")) not in (None, patch):
        raise ValueError(
            f"{_where(meta)}flag patch_size={flag} does not match the image embedding's "
            f"{patch}x{patch} RGB patches ({patch_dim} inputs)"
        )
    heads = {
        name: None
        if overrides.get(name) is not None
        else _heads(width, name.startswith("dec"), meta)
        for name, width in (("num_heads", emb), ("dec_num_heads", dec_emb))
    }
    config: dict[str, Any] = {
        "emb_dim": emb, "depth": _num_blocks(flat_orig, "encoder"),
        "num_heads": heads["num_heads"],
        "dec_emb_dim": dec_emb, "dec_depth": _num_blocks(flat_orig, "decoder"),
        "dec_num_heads": heads["dec_num_heads"], "mlp_ratio": hidden // emb,
        "patch_size": patch, "vocab_size": dims("text_embedding/embedding")[0],
    }  # fmt: skip
    for key, names in _EXTRAS.items():
        if (value := _flag(meta, key, *names)) is not None:
            config[key] = value
    config.update({k: v for k, v in overrides.items() if v is not None})
    unknown = [k for k in ("num_heads", "dec_num_heads") if config[k] is None]
    if unknown:
        raise ValueError(
            f"{_where(meta)}cannot tell the number of attention heads for widths {emb}/{dec_emb}: "
            f"the file does not record them; pass {' and '.join(_option(k) for k in unknown)}"
        )
    for name, width in (("num_heads", emb), ("dec_num_heads", dec_emb)):
        value = _as_int(config[name])
        if value is None or value <= 0 or width % value:
            raise ValueError(
                f"{_where(meta)}override {name}={config[name]!r:.40} (--{name.replace('_', '-')}) "
                f"cannot split width {width} into attention heads: expected a positive divisor"
            )
        config[name] = value
    return config


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')} N (override {name}=N)"


def summarize(params: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The text the CLI prints after an import: tensor and parameter counts, inferred config."""
    leaves = _flatten(params)
    total = sum(int(np.prod(np.shape(v))) for v in leaves.values())
    lines = [f"Mapped {len(leaves)} tensors ({total:,} parameters) from the original M3AE."]
    return "\n".join(lines + ["Inferred config:"] + [f"  {k} = {v}" for k, v in config.items()])


def import_reference(
    path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> tuple[dict, dict]:
    """`read_reference`, then `to_m3ae_params` and `infer_config`: `(our params, our config)`."""
    flat, meta = read_reference(path)
    return to_m3ae_params(flat), infer_config(flat, meta, overrides)
