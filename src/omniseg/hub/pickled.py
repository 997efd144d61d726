"""Reading pickled checkpoints (detectron2 `.pkl`, torch `.pth`/`.pt`) without running anything they name.

A pickle is a program: each global it names is imported and may be called. Published checkpoints need only
a few harmless ones (numpy's array and dtype reconstruction, `collections.OrderedDict`, torch's tensor and
storage rebuilds), so every other global is refused *before* it is imported, with its name in the error:

- detectron2 / AdelaiDet `.pkl` files (`pickle.dump` of `{"model": {name: ndarray}, "__author__": ...,
  "matching_heuristics": ...}`) go through `_AllowListUnpickler`, Python's documented way to restrict
  globals (`find_class`; extension codes and INST/OBJ resolve through it too, and persistent ids are
  refused);
- torch files (zip, or the legacy format) go through `torch.load(weights_only=True)`, torch's own
  restricted unpickler, with numpy's reconstruction functions added to its allow-list for checkpoints
  that hold numpy arrays.

numpy arrays come back as tensors; plain metadata (strings, numbers, lists, dicts) as it is.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import torch

from omniseg.hub.errors import CheckpointError

PICKLE_SUFFIXES = (".pkl", ".pickle")

# (module, name) -> the object: what a published checkpoint's pickle may name; nothing else is imported.
_NUMPY_CORE = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_NUMPY_NUMERIC = np._core.numeric if hasattr(np, "_core") else np.core.numeric
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 writes bytes (an array's raw data) from Python 3
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_CORE._reconstruct,  # numpy 1.x pickles
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_CORE._reconstruct,  # numpy 2.x pickles
    ("numpy.core.multiarray", "scalar"): _NUMPY_CORE.scalar,
    ("numpy._core.multiarray", "scalar"): _NUMPY_CORE.scalar,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_NUMERIC._frombuffer,  # pickle protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_NUMERIC._frombuffer,
}
# numpy's dtype classes (numpy.dtypes.Float32DType, ...), which numpy 2 pickles name
_ALLOWED.update({("numpy.dtypes", name): getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")})


class UnsafePickleError(CheckpointError):
    """A pickle names a global outside the allow-list; nothing of it was imported or run."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(f"{self.path}: refused: the pickle names {module}.{name}, which a checkpoint "
                                    f"does not need (allowed: numpy arrays and dtypes, OrderedDict, bytes); nothing in "
                                    f"the file was run")
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.path}: refused: the pickle uses persistent ids ({str(pid)[:60]}), which a "
                                f".pkl checkpoint does not; nothing in the file was run")


def read_pickled(path: str | os.PathLike) -> object:
    """The object a pickled checkpoint holds, with numpy arrays as tensors; UnsafePickleError names any
    global outside the allow-list, CheckpointError any other reason the file cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if zipfile.is_zipfile(path) or not _is_plain_pickle(path):
        return _as_tensors(_torch_load(path))
    try:
        with open(path, "rb") as f:
            return _as_tensors(_AllowListUnpickler(io.BufferedReader(f), path).load())
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _is_plain_pickle(path: Path) -> bool:
    """A `.pkl` (or any file whose pickle is not torch's legacy format, which starts with its magic number)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) < 2 or head[0] != 0x80:  # pickle protocol 2+ starts with PROTO
        return False
    try:  # torch's legacy format: a first pickle holding its magic number (read with the allow-list too)
        with open(path, "rb") as f:
            return _AllowListUnpickler(f, path).load() != 0x1950A86A20F9469CFC6C
    except UnsafePickleError:
        raise
    except Exception:
        return True


def _torch_load(path: Path):
    allowed = sorted({obj for obj in _ALLOWED.values()}, key=repr)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unknown = [n for n in _globals_named(path) if not _harmless(n)]
        what = f"names {unknown[0]}, which" if unknown else "names a global that"
        raise UnsafePickleError(f"{path}: refused: the checkpoint's pickle {what} a checkpoint does not need "
                                f"(torch.load(weights_only=True) with numpy arrays allowed); nothing in the file "
                                f"was run") from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def _harmless(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return (module, attr) in _ALLOWED or name.startswith("torch.") or name == "builtins.set"


def _globals_named(path: Path) -> list[str]:
    """Every global a torch checkpoint's pickles name, read from their opcodes (nothing is imported), for
    the error message: torch's own message names some globals by a compatibility alias."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            streams = [io.BytesIO(z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
    else:
        streams = [io.BytesIO(path.read_bytes())]
    names = []
    for stream in streams:
        for _ in range(4):  # a legacy file is 4 pickles in a row (magic, version, sys info, data), then storages
            try:
                names += _names_in_one_pickle(stream)
            except Exception:
                break
    return names


def _names_in_one_pickle(stream) -> list[str]:
    names, strings, memo, last = [], [], {}, None
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL":  # protocol <= 3; protocol 2 writes Python 2 names, read back as Python 3's
            module, name = arg.split(" ", 1)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            names.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
            strings.append(memo[arg])
        last = arg if isinstance(arg, str) and "UNICODE" in op.name else None
        if last is not None:
            strings.append(last)
        if op.name == "STOP":
            break
    return names


def _as_tensors(obj):
    """numpy arrays (of numbers or bools) -> tensors, through dicts, lists and tuples; the rest unchanged."""
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biufc":
        return torch.from_numpy(obj if obj.flags.c_contiguous and obj.flags.writeable else obj.copy(order="C"))
    if isinstance(obj, dict):
        return type(obj)((k, _as_tensors(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: _as_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_tensors(v) for v in obj)
    return obj
