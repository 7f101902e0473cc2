"""Tests for importing original M3AE parameters (npz exports and release-format pickles).

The release pickle is loaded only through `pipelines.safe_pickle`, whose own tests (hostile
payloads,
refused opcodes and dtypes, round trips) are in test_safe_pickle.py.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from m3ae.reference_import import infer_config, read_reference, summarize, to_m3ae_params
from pipelines.safe_pickle import InertRecord, safe_load_pickle, to_plain

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_PKL = FIXTURES / "m3ae_reference_release_format.pkl"
RELEASE_PARAMS = FIXTURES / "m3ae_reference_release_format_params.npz"
TINY_NPZ = FIXTURES / "m3ae_reference_tiny.npz"

# Our path -> original path, written out independently of the module's tables (from the spec).
_TOP = {
    "cls_token": "cls_token",
    "image_embed/kernel": "image_embedding/kernel",
    "image_embed/bias": "image_embedding/bias",
    "text_embed/embedding": "text_embedding/embedding",
    "enc_image_type": "encoder_image_type_embedding",
    "enc_text_type": "encoder_text_type_embedding",
    "dec_image_type": "decoder_image_type_embedding",
    "dec_text_type": "decoder_text_type_embedding",
    "image_mask_token": "image_mask_embedding",
    "text_mask_token": "text_mask_embedding",
    "dec_proj/kernel": "decoder_input_projection/kernel",
    "dec_proj/bias": "decoder_input_projection/bias",
    "image_head/kernel": "decoder_image_output/Dense_0/kernel",
    "image_head/bias": "decoder_image_output/Dense_0/bias",
    "text_head/kernel": "decoder_text_output/Dense_0/kernel",
    "text_head/bias": "decoder_text_output/Dense_0/bias",
}
_BLOCK = {
    "ln_attn": "LayerNorm_0",
    "attn/qkv": "Attention_0/Dense_0",
    "attn/out": "Attention_0/Dense_1",
    "ln_mlp": "LayerNorm_1",
    "mlp/fc1": "TransformerMLP_0/fc1",
    "mlp/fc2": "TransformerMLP_0/fc2",
}


def expected_mapping(depth: int, dec_depth: int) -> dict[str, str]:
    mapping = dict(_TOP)
    for stack, n in (("encoder", depth), ("decoder", dec_depth)):
        for i in range(n):
            for ours, orig in _BLOCK.items():
                names = ("scale", "bias") if ours.startswith("ln_") else ("kernel", "bias")
                for p in names:
                    mapping[f"{stack}/block_{i}/{ours}/{p}"] = f"{stack}/Block_{i}/{orig}/{p}"
        for p in ("scale", "bias"):
            mapping[f"{stack}/ln_final/{p}"] = f"{stack}/LayerNorm_0/{p}"
    return mapping


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def npz_params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k[len("param/") :]: z[k] for k in z.files if k.startswith("param/")}


def check_mapped(mapped: dict, flat: dict, depth: int, dec_depth: int) -> None:
    mapping = expected_mapping(depth, dec_depth)
    ours = flatten(mapped)
    assert set(ours) == set(mapping)
    assert sorted(mapping.values()) == sorted(flat)  # every source tensor used exactly once
    for key, orig in mapping.items():
        assert ours[key].dtype == flat[orig].dtype and np.array_equal(ours[key], flat[orig]), key


# ------------------------------------------------------------------------- release-format pickle
def test_release_pickle_recovers_every_tensor_exactly() -> None:
    flat, meta = read_reference(RELEASE_PKL)
    expected = npz_params(RELEASE_PARAMS)
    assert set(flat) == set(expected)
    for key, want in expected.items():
        got = flat[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(got, want), key
    check_mapped(to_m3ae_params(flat), expected, depth=1, dec_depth=1)
    assert meta["step"] == 1 and meta["epoch"] == 0
    assert meta["variant"]["m3ae.emb_dim"] == 32 and meta["variant"]["patch_size"] == 8


def test_release_pickle_becomes_plain_containers() -> None:
    raw = safe_load_pickle(RELEASE_PKL)
    state = raw["state"]
    assert isinstance(state, InertRecord)
    assert (state.record.module, state.record.name) == ("m3ae.model", "M3AETrainState")
    tx = state.record.state["tx"]
    assert isinstance(tx, InertRecord) and tx.record.module == "optax._src.base"
    plain = to_plain(raw)
    assert plain["state"]["params"]["params"]["cls_token"].shape == (1, 1, 32)
    assert plain["state"]["tokenizer_params"] is None


def test_release_pickle_config_needs_heads() -> None:
    flat, meta = read_reference(RELEASE_PKL)
    # The variant records widths and depths but not the head counts, and width 32 is in no size
    # table: the user must say.
    with pytest.raises(ValueError, match=r"num_heads=.*dec_num_heads="):
        infer_config(flat, meta)
    config = infer_config(flat, meta, {"num_heads": 4, "dec_num_heads": 2})
    assert config == {
        "emb_dim": 32,
        "depth": 1,
        "num_heads": 4,
        "dec_emb_dim": 16,
        "dec_depth": 1,
        "dec_num_heads": 2,
        "mlp_ratio": 4,
        "patch_size": 8,
        "vocab_size": 512,
        "text_length": 8,
    }
    text = summarize(to_m3ae_params(flat), config)
    assert "44 tensors" in text and f"{sum(v.size for v in flat.values()):,}" in text


# ------------------------------------------------------------------------------------- npz export
def test_npz_fixture_maps_and_infers_config() -> None:
    flat, meta = read_reference(TINY_NPZ)
    check_mapped(to_m3ae_params(flat), npz_params(TINY_NPZ), depth=2, dec_depth=1)
    config = infer_config(flat, meta)
    expected = dict(emb_dim=64, depth=2, num_heads=4, dec_emb_dim=32, dec_depth=1)
    expected |= dict(dec_num_heads=4, mlp_ratio=4, patch_size=8, vocab_size=30522)
    assert {k: config[k] for k in expected} == expected
    assert config["image_size"] == 32 and config["text_length"] == 16
    assert config["text_loss_weight"] == 0.1 and config["image_mask_ratio"] == 0.75


def test_unrecognised_files_are_rejected(tmp_path: Path) -> None:
    unrelated = tmp_path / "unrelated.pkl"
    unrelated.write_bytes(pickle.dumps({"foo": np.zeros(3)}))
    with pytest.raises(ValueError, match="unrelated.pkl"):
        read_reference(unrelated)
    no_params = tmp_path / "no_params.npz"
    np.savez(no_params, foo=np.zeros(3))
    with pytest.raises(ValueError, match=r"no_params\.npz.*param/"):
        read_reference(no_params)


# ----------------------------------------------------------- hostile trees in the mapping step
class _Payload:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_code_in_the_param_tree_is_refused(tmp_path: Path) -> None:
    # The unpickler turns the payload into an inert record (see test_safe_pickle.py); the
    # mapping step must then refuse it as a parameter rather than pass it on.
    marker = tmp_path / "pwned"
    touch = f"open({str(marker)!r}, 'w').close()"
    tree = {"cls_token": _Payload(exec, touch), "encoder": {"Block_0": {"x": np.zeros(2)}}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"step": 0, "state": {"params": {"params": tree}}}))
    with pytest.raises(ValueError, match=r"cls_token is not a numeric array"):
        read_reference(path)
    assert not marker.exists()


# ------------------------------------------------------------- generic containers, FrozenDict
class FrozenDict:
    """Stands in for flax's FrozenDict (pickled by reference, never imported by the loader)."""

    def __init__(self, d: dict) -> None:
        self._dict = d

    def __reduce__(self):
        return FrozenDict, (self._dict,)


class SlotFrozenDict:
    __slots__ = ("_dict", "_hash")

    def __init__(self, d: dict) -> None:
        self._dict, self._hash = d, None


@dataclasses.dataclass
class TrainState:
    step: int
    params: object


def release_tree() -> dict:
    """The release fixture's tensors as the nested dict of parameters a TrainState holds."""
    tree: dict = {}
    for key, value in npz_params(RELEASE_PARAMS).items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@pytest.mark.parametrize("wrap", [FrozenDict, SlotFrozenDict])
def test_train_state_with_frozen_dicts(tmp_path: Path, wrap) -> None:
    flat = npz_params(RELEASE_PARAMS)
    tree = release_tree()
    ckpt = {"step": np.int64(7), "variant": {"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2}}
    ckpt["state"] = TrainState(step=7, params=wrap({"params": wrap(tree)}))
    path = tmp_path / "ckpt.pkl"
    path.write_bytes(pickle.dumps(ckpt, protocol=2))
    got, meta = read_reference(path)
    assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
    assert meta["step"] == 7
    config = infer_config(got, meta)
    assert (config["num_heads"], config["dec_num_heads"]) == (4, 2)


# ------------------------------------------------------------------------------- mapping errors
def test_mapping_refuses_leftovers_missing_and_unsupported_models() -> None:
    flat, _ = read_reference(TINY_NPZ)
    with pytest.raises(ValueError, match=re.escape("extra/thing")):
        to_m3ae_params({**flat, "extra/thing": np.zeros(1)})
    missing = {k: v for k, v in flat.items() if k != "encoder/Block_1/LayerNorm_1/scale"}
    with pytest.raises(ValueError, match=re.escape("encoder/Block_1/LayerNorm_1/scale")):
        to_m3ae_params(missing)
    with pytest.raises(ValueError, match="output_head_depth"):
        to_m3ae_params({**flat, "decoder_image_output/Dense_1/kernel": np.zeros((2, 2))})
    no_types = {k: v for k, v in flat.items() if not k.endswith("_type_embedding")}
    with pytest.raises(ValueError, match="use_type_embedding"):
        to_m3ae_params(no_types)


def _shapes_only(emb: int, depth: int, dec_emb: int, dec_depth: int, patch: int) -> dict:
    # Broadcast views carry the shapes without allocating a real model.
    z = np.float32(0)
    flat = {
        "image_embedding/kernel": np.broadcast_to(z, (patch * patch * 3, emb)),
        "text_embedding/embedding": np.broadcast_to(z, (30522, emb)),
        "decoder_input_projection/kernel": np.broadcast_to(z, (emb, dec_emb)),
    }
    for stack, width, n in (("encoder", emb, depth), ("decoder", dec_emb, dec_depth)):
        for i in range(n):
            key = f"{stack}/Block_{i}/TransformerMLP_0/fc1/kernel"
            flat[key] = np.broadcast_to(z, (width, 4 * width))
    return flat


def test_heads_fall_back_to_the_original_size_table() -> None:
    base = _shapes_only(768, 12, 512, 8, 16)
    config = infer_config(base, {})
    assert (config["num_heads"], config["dec_num_heads"], config["depth"]) == (12, 16, 12)
    assert config["patch_size"] == 16 and config["dec_depth"] == 8
    small = infer_config(
        _shapes_only(384, 12, 512, 8, 16), {"variant": {"m3ae.model_type": "small"}}
    )
    assert small["num_heads"] == 6
    with pytest.raises(ValueError, match="num_heads="):
        infer_config(_shapes_only(96, 2, 64, 1, 8), {})
    with pytest.raises(ValueError, match="patch"):
        infer_config(base, {"patch_size": 14})


# ------------------------------------------- bad files and flags: one line naming the file
def _release_like(tmp_path: Path, variant: dict, name: str = "ref.pkl") -> Path:
    """The release fixture's tensors in a pickled TrainState, with these flags."""
    tree = release_tree()
    ckpt = {"step": 3, "variant": variant, "state": TrainState(3, FrozenDict({"params": tree}))}
    path = tmp_path / name
    path.write_bytes(pickle.dumps(ckpt, protocol=4))
    return path


def _cli(capsys, *args) -> tuple[int, list[str]]:
    from m3ae.cli import main

    code = main(["import-reference", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_refused_pickles_are_one_line_cli_errors(tmp_path: Path, capsys) -> None:
    ext = tmp_path / "ext.pkl"
    ext.write_bytes(b"\x80\x02}q\x00X\x05\x00\x00\x00stateq\x01\x82\x07s.")  # {"state": EXT1 7}
    objects = tmp_path / "objects.pkl"
    tree = {"cls_token": np.array([None], dtype=object), "encoder": {}}
    objects.write_bytes(pickle.dumps({"state": {"params": {"params": tree}}}, protocol=2))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(RELEASE_PKL.read_bytes()[:5000])
    cases = {
        ext: "opcode EXT1 at byte 17 is refused: copyreg extension codes",
        objects: "numpy dtype 'O8' is refused (an object array)",
        truncated: "not a well-formed pickle (",
    }
    for path, detail in cases.items():
        with pytest.raises(ValueError) as caught:
            read_reference(path)
        assert str(caught.value).startswith(f"{path}: {detail}"), str(caught.value)
        code, err = _cli(capsys, path, tmp_path / "out")
        assert code == 2 and err == [f"m3ae import-reference: error: {caught.value}"]
        assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_object_arrays_and_bad_meta_in_npz_are_refused(tmp_path: Path) -> None:
    flat = npz_params(TINY_NPZ)
    objects = tmp_path / "objects.npz"
    np.savez(objects, **{"param/cls_token": np.array([None, 1], dtype=object)})
    with pytest.raises(ValueError) as caught:
        read_reference(objects)
    assert str(caught.value) == (
        f"{objects}: array 'param/cls_token' is refused: an object array (dtype=object) is never "
        "unpickled; only numeric arrays are read"
    )
    meta = tmp_path / "meta.npz"
    np.savez(meta, **{f"param/{k}": v for k, v in flat.items()}, **{"meta/config": ["{oops"]})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(meta))}: meta/config is not one JSON"):
        read_reference(meta)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(broken))}: not a readable \.npz"):
        read_reference(broken)


@pytest.mark.parametrize(
    "variant,message",
    [
        ({"m3ae.num_heads": "twelve", "m3ae.dec_num_heads": 2},
         "flag m3ae.num_heads='twelve' is not an integer; pass --num-heads"),
        ({"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2.5},
         "flag m3ae.dec_num_heads=2.5 is not an integer; pass --dec-num-heads"),
        ({"m3ae.num_heads": [4], "m3ae.dec_num_heads": 2},
         "flag m3ae.num_heads=[4] is not an integer; pass --num-heads"),
        ({"m3ae.num_heads": 5, "m3ae.dec_num_heads": 2},
         "flag m3ae.num_heads=5 cannot split width 32 into heads (expected a positive divisor "
         "of 32); pass --num-heads"),
        ({"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2, "patch_size": "eight"},
         "flag patch_size='eight' is not a positive integer"),
        ({"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2, "image_size": -256},
         "flag image_size=-256 is not a positive integer"),
        ({"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2, "m3ae.image_mask_ratio": "most"},
         "flag m3ae.image_mask_ratio='most' is not a number in [0, 1)"),
        ({"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2, "m3ae.text_loss_weight": -1},
         "flag m3ae.text_loss_weight=-1 is not a number >= 0"),
        ({"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2, "text_all_token_loss": "maybe"},
         "flag text_all_token_loss='maybe' is not true or false"),
    ],
)  # fmt: skip
def test_malformed_flags_name_the_file_flag_and_value(tmp_path: Path, variant, message) -> None:
    path = _release_like(tmp_path, variant)
    flat, meta = read_reference(path)
    with pytest.raises(ValueError) as caught:
        infer_config(flat, meta)
    assert str(caught.value) == f"{path}: {message}"


def test_loss_flags_of_the_training_script_carry_over(tmp_path: Path) -> None:
    flags = {"m3ae.num_heads": 4, "m3ae.dec_num_heads": 2, "image_all_token_loss": True}
    flags |= {"text_all_token_loss": "False", "unpaired_text_loss_weight": 0.25}
    flat, meta = read_reference(_release_like(tmp_path, flags))
    config = infer_config(flat, meta)
    assert config["image_all_token_loss"] is True and config["text_all_token_loss"] is False
    assert config["unpaired_text_loss_weight"] == 0.25


def test_non_numeric_head_count_via_cli_and_its_override(tmp_path: Path, capsys) -> None:
    path = _release_like(tmp_path, {"m3ae.num_heads": "twelve", "m3ae.dec_num_heads": "2"})
    code, err = _cli(capsys, path, tmp_path / "a")
    assert code == 2
    assert err == [
        f"m3ae import-reference: error: {path}: flag m3ae.num_heads='twelve' is not an "
        "integer; pass --num-heads"
    ]
    code, err = _cli(capsys, path, tmp_path / "b", "--num-heads", "4")  # the override wins
    assert code == 0 and err == []
    config = json.loads((tmp_path / "b" / "config.json").read_text())["model"]
    assert (config["num_heads"], config["dec_num_heads"]) == (4, 2)  # "2": a number as text
    code, err = _cli(capsys, path, tmp_path / "c", "--num-heads", "3")
    assert code == 2 and err == [
        f"m3ae import-reference: error: {path}: override num_heads=3 (--num-heads) cannot split "
        "width 32 into attention heads: expected a positive divisor"
    ]
