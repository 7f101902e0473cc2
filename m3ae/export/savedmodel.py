"""`export_savedmodel`: a pretrained M3AE / MAE directory as a TensorFlow SavedModel (jax2tf).

    summary = export_savedmodel("runs/demo/model", "runs/demo/savedmodel")

    loaded = tf.saved_model.load("runs/demo/savedmodel")
    loaded.signatures["image"](image=uint8_images)["embedding"]            # (B, D) float32
    loaded.signatures["text"](text=ids, text_padding_mask=padding)["embedding"]
    loaded.signatures["joint"](image=..., text=..., text_padding_mask=...)["embedding"]

One signature per feature kind of the encode path (`m3ae.encode`): `image` (the default
signature too), and for an M3AE `text` and `joint`. Each runs that path itself, converted by
`jax2tf`: the same module method, input convention and pooling as `m3ae embed` and
`PretrainedM3AE.encode*`, so the features are ours (tested to 1e-5 relative; on the same machine
they agree bit for bit). The batch dimension is symbolic; the other dimensions are the model's:

* `image`: uint8 `(B, S, S, 3)`, pictures already through the loader's evaluation transform
  (`PretrainedM3AE.pixels`: resize the short side, centre crop, bicubic), normalised inside.
* `text`: int32 ids `(B, L)` from the bundled tokenizer (`assets.extra/tokenizer`, Hugging Face
  files, called as the manifest's `tokenize` says: no special tokens, truncated and padded with
  id 0 to `L`, as `PretrainedM3AE.tokenize`) and float32 `text_padding_mask` `(B, L)` (1 = pad).

`pool` (`cls`, the paper's probe feature, or `mean`) and `normalize` (L2) are fixed at export.
The parameters are SavedModel variables, not constants folded into the program. The program is
StableHLO for `platforms` (CPU and CUDA by default), serialized for the StableHLO version of the
installed TensorFlow: JAX writes a newer one by default, which an older TensorFlow cannot read.
`assets.extra/m3ae_export.json` says what was exported from where (TF Serving ignores it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from m3ae.export.safetensors_dir import check_out
from pipelines.tf_extra import import_tensorflow
from pipelines.tokenizer import TOKENIZE

MANIFEST = "m3ae_export.json"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
WHAT = "m3ae export --format savedmodel"


def _signature_inputs(kind: str, size: int, length: int, tf: Any) -> dict[str, Any]:
    """The named TensorSpecs a signature of `kind` takes (batch dimension None)."""
    specs = {}
    if kind in ("image", "joint"):
        specs["image"] = tf.TensorSpec([None, size, size, 3], tf.uint8, name="image")
    if kind in ("text", "joint"):
        specs["text"] = tf.TensorSpec([None, length], tf.int32, name="text")
        specs["text_padding_mask"] = tf.TensorSpec(
            [None, length], tf.float32, name="text_padding_mask"
        )
    return specs


@contextlib.contextmanager
def stablehlo_for(tf: Any) -> Iterator[str]:
    """Serialize JAX exports, while inside, for the StableHLO version this TensorFlow reads.

    JAX writes its portable artifacts for a consumer at most about four weeks older than itself
    (`_export._module_to_bytecode`); a TensorFlow release may be months older and then fails to
    load the program ("failed to deserialize portable artifact"). The older of the two versions
    is chosen here; a program using a StableHLO feature newer than it fails at export, loudly.
    """
    try:
        from jax._src import xla_bridge
        from jax._src.export import _export
        from jax._src.lib import _jax
        from jax._src.lib.mlir.dialects import hlo
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
    except ImportError as e:
        raise RuntimeError(f"{WHAT}: cannot match JAX's StableHLO to TensorFlow's: {e}") from e
    ours = hlo.get_version_from_compatibility_requirement(
        hlo.StablehloCompatibilityRequirement.WEEK_4
    )
    target = tf_stablehlo.get_smaller_version(ours, tf_stablehlo.get_current_version())
    original = _export._module_to_bytecode

    def to_bytecode(module: Any) -> bytes:
        sdy = xla_bridge.get_backend().serialize_with_sdy
        return _jax.mlir.serialize_portable_artifact(module, target, sdy)

    _export._module_to_bytecode = to_bytecode
    try:
        yield target
    finally:
        _export._module_to_bytecode = original


def parse_platforms(platforms: str | Sequence[str]) -> tuple[str, ...]:
    """`"cpu,cuda"` or a sequence -> checked platform names, in the order given."""
    items = platforms.split(",") if isinstance(platforms, str) else list(platforms)
    names = tuple(dict.fromkeys(p.strip().lower() for p in items if p.strip()))
    unknown = [p for p in names if p not in PLATFORMS]
    if not names or unknown:
        raise ValueError(f"--platforms {platforms!r}: choose from {', '.join(PLATFORMS)}")
    return names


def export_savedmodel(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    pool: str = "cls",
    normalize: bool = False,
    platforms: str | Sequence[str] = ("cpu", "cuda"),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the encoders of a pretrained M3AE / MAE directory as a SavedModel (module doc) to
    `out_dir`, built in a temporary directory beside it and renamed; returns a summary."""
    from m3ae.encode import Encoder, Features
    from m3ae.model import M3AE
    from m3ae.pretrained import read_config

    platforms = parse_platforms(platforms)
    Features(("image",), pool)  # bad options fail before TensorFlow is imported (seconds)
    src = str(model_dir)
    if "://" not in src and not Path(src).is_dir():
        raise FileNotFoundError(f"model directory {src} does not exist")
    out = Path(out_dir)
    check_out(out, src, overwrite, lambda out: (out / "assets.extra" / MANIFEST).is_file())
    tf = import_tensorflow(WHAT)
    import jax
    from jax.experimental import jax2tf

    pretrained = M3AE.from_pretrained(src)
    model, size, length = pretrained.model, pretrained.image_size, pretrained.text_length
    kinds = ("image", "text", "joint") if model.use_text else ("image",)
    encoder = Encoder(model, pretrained.mean, pretrained.std)  # the encode path, unsharded
    params = jax.device_get(pretrained.params)

    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, params)  # saved as variables
    signatures, shapes = {}, {}  # kind -> concrete function; kind -> input -> [None, ...]
    with stablehlo_for(tf) as stablehlo:
        for kind in kinds:
            features = Features((kind,), pool, bool(normalize))
            specs = _signature_inputs(kind, size, length, tf)
            shapes[kind] = {name: [None, *spec.shape[1:]] for name, spec in specs.items()}

            def encode(params: Any, batch: dict, features: Features = features) -> Any:
                return encoder.forward(params, batch, features)[features.kinds[0]]

            converted = jax2tf.convert(
                encode,
                polymorphic_shapes=[None, {k: "(b, ...)" for k in specs}],
                with_gradient=False,
                native_serialization_platforms=platforms,
            )

            def serve(converted: Any = converted, **inputs: Any) -> dict[str, Any]:
                return {"embedding": converted(module.params, inputs)}

            fn = tf.function(serve, input_signature=None, autograph=False)
            signatures[kind] = fn.get_concrete_function(**specs)
        signatures["serving_default"] = signatures["image"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tf.saved_model.save(module, str(tmp), signatures=signatures)
            extra = tmp / "assets.extra"
            extra.mkdir()
            pretrained.tokenizer.save_pretrained(str(extra / "tokenizer"))
            meta = read_config(src)
            source = src if "://" in src else str(Path(src).resolve())
            manifest = {
                "format": "m3ae-savedmodel/1",
                "model_dir": source,
                "step": meta.get("step"),
                "model": "M3AE" if model.use_text else "MAE",
                "signatures": shapes,
                "embedding_dim": int(model.emb_dim),
                "pool": pool,
                "normalize": bool(normalize),
                "preprocess": pretrained.preprocess_config,
                "tokenize": TOKENIZE,
                "platforms": list(platforms),
                "stablehlo": stablehlo,
                "tensorflow": tf.__version__,
                "jax": jax.__version__,
            }
            (extra / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": str(out),
        "model": manifest["model"],
        "signatures": list(kinds),
        "image_size": size,
        "text_length": length,
        "embedding_dim": manifest["embedding_dim"],
        "parameters": int(sum(v.size for v in jax.tree_util.tree_leaves(params))),
        "platforms": list(platforms),
        "stablehlo": stablehlo,
    }
