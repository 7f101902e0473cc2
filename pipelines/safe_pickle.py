"""Restricted unpickling: read a pickle without importing or calling anything it names.

Threat model: the file is untrusted. A plain `pickle.load` imports every module a GLOBAL/
STACK_GLOBAL opcode names and calls whatever REDUCE, NEWOBJ, INST, OBJ and BUILD are handed, so
a crafted file runs arbitrary code (`os.system`, `eval`, `getattr(__import__("os"), ...)`).
`safe_load_pickle` gives a file no such power:

* Nothing from the file is ever imported or called. `find_class` never touches `sys.modules` or
  the import system; it answers every GLOBAL from a fixed table of our own functions.
* Allowed globals (the table), each implemented here and validating its arguments:
  `numpy.dtype` (numeric kinds b/i/u/f/c only: object dtypes are refused), `numpy.core` /
  `numpy._core` `multiarray._reconstruct`, `multiarray.scalar` and `numeric._frombuffer` (arrays
  are rebuilt by `np.frombuffer` from checked bytes, shape and dtype), `collections.OrderedDict`
  (a plain dict, from an already built list/tuple/dict), `_codecs.encode(str, "latin1")` and
  `builtins.bytes()` (how protocols 0-2 spell bytes). BUILD on one of these is refused.
* Every other global becomes an `InertRecord`: a stand-in that, when called, constructed
  (NEWOBJ), given state (BUILD) or items (SETITEM(S), APPEND(S), ADDITEMS), only records what it
  was given in its `RecordData`. So `os.system("...")` loads as a record of that call.
* Opcodes that bypass `find_class` are refused before unpickling starts: EXT1/2/4 (copyreg's
  process-global extension registry) and PERSID/BINPERSID (persistent ids). All other opcodes
  only build containers and scalars in the unpickler itself.

Every refusal, and every file that is not a well-formed pickle (truncated, unknown opcodes, a
stack that does not add up), raises `UnsafePickleError`, a `ValueError` with one line; given a
path, the line starts with it (`ref.pkl: opcode EXT1 at byte 2 is refused: ...`), so the CLI
reports it as a bad input file, never with a traceback.

`to_plain` then turns records whose state is a dict (dataclasses, flax TrainStates and
FrozenDicts, ...) into nested dicts, so a checkpoint reads as plain containers of arrays.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

__all__ = ["InertRecord", "RecordData", "UnsafePickleError", "safe_load_pickle", "to_plain"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle uses something the safe loader refuses (object arrays, extensions, ...), or is
    not a well-formed pickle. A ValueError too: a bad input file, reported in one line."""


# EXT opcodes read copyreg's process-global extension cache without asking find_class;
# persistent ids need a resolver we do not have. Both are refused before unpickling starts.
_REFUSED_OPCODES = frozenset({"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"})


@dataclass
class RecordData:
    module: str
    name: str
    origin: str  # "global", "call" (REDUCE/INST/OBJ) or "new" (NEWOBJ)
    callee: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    state: Any = None  # what BUILD passed to __setstate__
    items: dict = field(default_factory=dict)  # SETITEM(S)
    appended: list = field(default_factory=list)  # APPEND(S) (no `extend`: one by one), ADDITEMS


class InertRecord(type):
    """Metaclass of every stand-in built by `safe_load_pickle`; `record.record` holds its data.

    Records are classes only because the unpickler's NEWOBJ insists on a type. Calling one, its
    `__new__`, BUILD, SETITEM(S) and APPEND(S) merely store their arguments.
    """

    record: RecordData

    def __call__(cls, *args: Any, **kwargs: Any) -> InertRecord:
        return _new_record(cls.record.module, cls.record.name, "call", cls, args, kwargs)

    def __setstate__(cls, state: Any) -> None:
        cls.record.state = state

    def __setitem__(cls, key: Any, value: Any) -> None:
        cls.record.items[key] = value

    def append(cls, value: Any) -> None:
        cls.record.appended.append(value)

    add = append

    def __repr__(cls) -> str:
        return f"<inert {cls.record.origin} {cls.record.module}.{cls.record.name}>"


def _record_new(cls: InertRecord, *args: Any, **kwargs: Any) -> InertRecord:
    return _new_record(cls.record.module, cls.record.name, "new", cls, args, kwargs)


def _new_record(module: Any, name: Any, origin: str, callee: Any, args: tuple, kwargs: dict):
    data = RecordData(str(module), str(name), origin, callee, tuple(args), dict(kwargs))
    # A fixed class name: strings from the file never reach type() (a NUL would raise there).
    return type.__new__(InertRecord, "Inert", (), {"record": data, "__new__": _record_new})


# ---------------------------------------------------------------- our stand-ins for numpy & co.
@dataclass
class _DTypeSpec:
    """`numpy.dtype(name, align, copy)` plus its BUILD state, resolved by us."""

    dtype: np.dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not isinstance(state, tuple) or len(state) < 5 or state[2:5] != (None, None, None):
            raise UnsafePickleError(f"unsupported numpy dtype state {state!r:.200}")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


def _safe_dtype(name: Any, align: Any = False, copy: Any = False) -> _DTypeSpec:
    dtype = None
    if isinstance(name, str) and re.fullmatch(r"[a-z?]\d{0,2}", name):
        try:
            dtype = np.dtype(name)
        except (TypeError, ValueError):  # "z9": no such type
            pass
    if dtype is None or dtype.kind not in "biufc":  # numbers only: object 'O' is refused here
        what = "an object array" if isinstance(name, str) and name[:1] == "O" else "not numeric"
        raise UnsafePickleError(
            f"numpy dtype {name!r:.40} is refused ({what}): only bool, int, uint, float and "
            "complex arrays are read"
        )
    return _DTypeSpec(dtype)


def _build_array(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """Our `numpy._core.numeric._frombuffer(buf, dtype, shape, order)`."""
    if isinstance(buf, str):  # Python 2 wrote array data as a latin-1 str
        buf = buf.encode("latin-1")
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer):
        raise UnsafePickleError(f"array data must be bytes, not {type(buf).__name__}")
    if not isinstance(dtype, _DTypeSpec):
        raise UnsafePickleError(f"array dtype must be a numpy dtype, not {dtype!r:.80}")
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
        raise UnsafePickleError(f"bad array shape {shape!r:.80}")
    data = memoryview(buf).cast("B")  # no copy here: the array below gets its own memory
    if data.nbytes != math.prod(shape) * dtype.dtype.itemsize or order not in ("C", "F"):
        raise UnsafePickleError(f"array data does not match shape {shape} and {dtype.dtype}")
    return np.frombuffer(data, dtype.dtype).reshape(shape, order=order).copy(order="K")


class _ArraySpec:
    """Result of `numpy...multiarray._reconstruct`; BUILD supplies the data."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("unsupported ndarray state")
        _, shape, dtype, is_fortran, raw = state
        self.array = _build_array(raw, dtype, shape, "F" if is_fortran else "C")


def _safe_latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocols 0-2 have no bytes opcode: bytes arrive as `_codecs.encode(str, "latin1")`
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("only _codecs.encode(str, 'latin1') is supported")
    return text.encode("latin-1")


def _safe_ordered_dict(items: Any = ()) -> dict:
    # Only containers the unpickler already built: no lazy iterables from the file.
    if not isinstance(items, list | tuple | dict):
        raise UnsafePickleError(
            f"OrderedDict({type(items).__name__}) is refused (only of a list, tuple or dict)"
        )
    return dict(items)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): _safe_dtype,
    ("collections", "OrderedDict"): _safe_ordered_dict,
    ("_codecs", "encode"): _safe_latin1,
    **{(m, "bytes"): lambda: b"" for m in ("builtins", "__builtin__")},  # b"" in protocols 0-2
}
for _np in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_np}.numeric", "_frombuffer")] = _build_array
    _SAFE_GLOBALS[(f"{_np}.multiarray", "_reconstruct")] = lambda subtype, shape, code: _ArraySpec()
    _SAFE_GLOBALS[(f"{_np}.multiarray", "scalar")] = lambda d, raw=b"": _build_array(raw, d, ())[()]


class _SafeCall:
    """Hands out an allowlisted function; BUILD on it (to rewrite its defaults, say) is refused."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError("BUILD on a numpy/collections global is refused")


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._globals: dict[tuple[str, str], InertRecord] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SafeCall(_SAFE_GLOBALS[module, name])
        if (module, name) not in self._globals:  # one record per global, like one import
            self._globals[module, name] = _new_record(module, name, "global", None, (), {})
        return self._globals[module, name]

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are refused")


_OPCODE_WHY = {
    "EXT": "copyreg extension codes name objects outside the loader's allowlist",
    "PER": "persistent ids need a resolver this loader does not have",
}


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def safe_load_pickle(
    path_or_file: str | os.PathLike | IO[bytes], *, encoding: str = "ASCII"
) -> Any:
    """Unpickle without importing any module or running any code named in the file.

    `encoding` decodes Python 2 `str`s, as in `pickle.load`; use "latin1" for Python 2 numpy
    pickles, whose array data and dtype names are such strings. Raises `UnsafePickleError` (a
    ValueError; its one line starts with the path when given one) for anything refused and for
    files that are not well-formed pickles.
    """
    label = None
    if isinstance(path_or_file, str | os.PathLike):
        label = os.fspath(path_or_file)
        with open(path_or_file, "rb") as f:
            data = f.read()
    else:
        data = path_or_file.read()
    where = f"{label}: " if label else ""
    try:
        for op, _, pos in pickletools.genops(data):
            if op.name in _REFUSED_OPCODES:
                raise UnsafePickleError(
                    f"opcode {op.name} at byte {pos} is refused: {_OPCODE_WHY[op.name[:3]]}"
                )
        return _resolve(_SafeUnpickler(io.BytesIO(data), encoding).load(), {})
    except UnsafePickleError as e:
        text = _one_line(e)
        text = text if "refus" in text else f"refused: {text}"
        raise UnsafePickleError(where + text) from e
    except Exception as e:  # noqa: BLE001 - nothing from the file ran: a malformed pickle
        detail = _one_line(f"{type(e).__name__}: {e}")
        raise UnsafePickleError(f"{where}not a well-formed pickle ({detail})") from e


def _resolve(obj: Any, memo: dict) -> Any:
    """Replace `_ArraySpec`s by their arrays, in containers and record data."""
    if id(obj) in memo:  # memo keeps each original alive, so no id is reused during the walk
        return memo[id(obj)][1]
    if isinstance(obj, _ArraySpec):
        if obj.array is None:
            raise UnsafePickleError("ndarray without data")
        return obj.array
    memo[id(obj)] = (obj, obj)
    if isinstance(obj, dict):
        obj.update((k, _resolve(v, memo)) for k, v in list(obj.items()))
    elif isinstance(obj, list):
        obj[:] = [_resolve(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        memo[id(obj)] = (obj, tuple(_resolve(v, memo) for v in obj))
    elif isinstance(obj, InertRecord):
        rec = obj.record
        rec.args, rec.state = _resolve(rec.args, memo), _resolve(rec.state, memo)
        for part in (rec.kwargs, rec.items, rec.appended):
            _resolve(part, memo)
    return memo[id(obj)][1]


def to_plain(obj: Any, _memo: dict | None = None) -> Any:
    """Records whose state is a dict become dicts, recursively; flax `FrozenDict`s are unwrapped.

    So `to_plain(release)["state"]["params"]["params"]` is a nested dict of arrays. Records with
    no dict state (functions, optax states, ...) stay records.
    """
    memo = {} if _memo is None else _memo  # id -> (original, result), as in _resolve
    if id(obj) in memo:
        return memo[id(obj)][1]
    if isinstance(obj, InertRecord):
        rec = obj.record
        if rec.name == "FrozenDict" and len(rec.args) == 1 and isinstance(rec.args[0], dict):
            return to_plain(rec.args[0], memo)  # FrozenDict.__reduce__: (FrozenDict, (dict,))
        state = rec.state if isinstance(rec.state, tuple) else (rec.state,)  # (dict, slots)?
        parts = [rec.items] + [s for s in state if isinstance(s, dict)]
        if not any(parts):
            return obj
        out: dict = {}
        memo[id(obj)] = (obj, out)
        out.update((k, to_plain(v, memo)) for part in parts for k, v in part.items())
        if set(out) <= {"_dict", "_hash"} and isinstance(out.get("_dict"), dict):
            memo[id(obj)] = (obj, out["_dict"])  # a FrozenDict rebuilt from its slots
        return memo[id(obj)][1]
    if isinstance(obj, dict | list):
        new: Any = {} if isinstance(obj, dict) else []
        memo[id(obj)] = (obj, new)
        if isinstance(obj, dict):
            new.update((k, to_plain(v, memo)) for k, v in obj.items())
        else:
            new.extend(to_plain(v, memo) for v in obj)
        return new
    return tuple(to_plain(v, memo) for v in obj) if isinstance(obj, tuple) else obj
