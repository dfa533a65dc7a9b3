"""The tensors of a TorchScript archive (``torch.jit.save``; OpenAI's CLIP releases), read as data, running none of it.

``torch.jit.load`` compiles the archive's code and runs scripted ``__setstate__`` methods, so a crafted file can
write files while it loads. Here ``<name>/data.pkl`` is unpickled with an allow list (tensors, their ``data/N``
storages, ``OrderedDict``, TorchScript's list and type-tag helpers) and every ``__torch__`` class becomes an
inert record of its pickled state. Which attributes are parameters and buffers is read from the class
declarations in ``code/`` (parsed, never run), so the keys are those of ``torch.jit.load(path).state_dict()``.
"""
from __future__ import annotations

import ast
import collections
import io
import math
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The storage classes TorchScript's pickler names, and the dtype of each one's elements.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class TorchScriptError(ValueError):
    """An archive refused (it needs code or Python objects to load) or unreadable; the message says why."""


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    data: torch.UntypedStorage


class _ScriptObject:
    """An object of a TorchScript class as inert data: its class's qualified name and its pickled state."""

    qualified_name = ""
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _as_is(value: Any, *_: Any) -> Any:
    """TorchScript's ``build_*list`` / ``restore_type_tag`` helpers: type information Python does not need."""
    return value


def _is_index(value: Any) -> bool:
    return type(value) is int and value >= 0


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """A view of a storage read from the archive, checked to lie inside it (``set_`` would grow the storage)."""
    if not (isinstance(storage, _Storage) and _is_index(storage_offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride) and all(map(_is_index, size + stride))):
        raise TorchScriptError("a tensor record is malformed (not storage, offset, size, stride); the archive "
                               "is corrupt")
    itemsize = storage.dtype.itemsize
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if math.prod(size) else -1
    if (last + 1) * itemsize > storage.data.nbytes():
        raise TorchScriptError(f"a tensor of size {size} reaches past the end of its storage "
                               f"({storage.data.nbytes()} bytes); the archive is corrupt")
    return torch.empty(0, dtype=storage.dtype).set_(storage.data, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for plain tensors: ``requires_grad`` is dropped, as the data is weights."""
    if backward_hooks or metadata:
        raise TorchScriptError("a tensor carries backward hooks or metadata; only plain tensors are read")
    return _rebuild_tensor(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,  # the (empty) backward hooks of every tensor
    ("torch.jit._pickle", "restore_type_tag"): _as_is,
    ("torch.jit._pickle", "build_intlist"): _as_is,
    ("torch.jit._pickle", "build_doublelist"): _as_is,
    ("torch.jit._pickle", "build_boollist"): _as_is,
    ("torch.jit._pickle", "build_tensorlist"): _as_is,
    ("torch", "device"): _as_is,  # a device attribute stays its name: tensors are read onto the CPU
}


class _DataUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` allowing only the globals above, storage types and ``__torch__`` classes."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified_name = f"{module}.{name}"
            if qualified_name not in self._classes:
                self._classes[qualified_name] = type("ScriptObject", (_ScriptObject,),
                                                     {"qualified_name": qualified_name})
            return self._classes[qualified_name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) not in _ALLOWED_GLOBALS:
            raise TorchScriptError(
                f"refusing to load it: its data.pkl asks for the Python global {module}.{name}, and only tensors, "
                f"storages and TorchScript module state are read from TorchScript archives (unpickling anything "
                f"else can run arbitrary code)")
        return _ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        """A ``('storage', storage type, key, location, numel)`` record -> the bytes of ``data/<key>``, on the CPU."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and pid[2].isalnum() and _is_index(pid[4])):
            raise TorchScriptError(f"unexpected persistent id {pid!r:.100} in data.pkl; the archive is corrupt")
        _, storage_type, key, _, numel = pid
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _read_storage(self._archive, f"{self._prefix}/data/{key}",
                                                          storage_type.dtype, numel)
        if storage.dtype != storage_type.dtype:
            raise TorchScriptError(f"storage {key} is read as both {storage.dtype} and {storage_type.dtype}; the "
                                   f"archive is corrupt")
        return storage


def _read_storage(archive: zipfile.ZipFile, record: str, dtype: torch.dtype, numel: int) -> _Storage:
    nbytes = numel * dtype.itemsize
    try:
        info = archive.getinfo(record)
    except KeyError:
        raise TorchScriptError(f"data.pkl refers to a missing record {record}; the archive is truncated or "
                               f"corrupt") from None
    if info.file_size != nbytes:
        raise TorchScriptError(f"record {record} holds {info.file_size} bytes where {numel} {dtype} elements need "
                               f"{nbytes}; the archive is truncated or corrupt")
    data = torch.empty(nbytes, dtype=torch.uint8)
    with archive.open(info) as f:
        if nbytes and f.readinto(memoryview(data.numpy())) != nbytes:
            raise TorchScriptError(f"record {record} is shorter than its header says; the archive is corrupt")
    return _Storage(dtype, data.untyped_storage())


@dataclass(frozen=True)
class _ClassDeclaration:
    is_module: bool
    parameters: frozenset[str]
    buffers: frozenset[str]
    has_setstate: bool


def _declaration(node: ast.ClassDef, record: str) -> _ClassDeclaration:
    """What one ``class X(Module):`` of TorchScript's printed code declares in its ``__parameters__`` and friends."""
    names = {"__parameters__": frozenset(), "__buffers__": frozenset()}
    for statement in node.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and statement.targets[0].id in names):
            try:
                value = ast.literal_eval(statement.value)
            except ValueError:
                value = None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TorchScriptError(f"{record}: {node.name}.{statement.targets[0].id} is not a list of names")
            names[statement.targets[0].id] = frozenset(value)
    return _ClassDeclaration(
        is_module=any(isinstance(base, ast.Name) and base.id == "Module" for base in node.bases),
        parameters=names["__parameters__"], buffers=names["__buffers__"],
        has_setstate=any(isinstance(s, ast.FunctionDef) and s.name == "__setstate__" for s in node.body))


class _Declarations:
    """The classes declared by an archive's ``code/`` records, each file parsed (never run) on first use."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self._archive, self._prefix = archive, prefix
        self._files: dict[str, dict[str, _ClassDeclaration]] = {}

    def __getitem__(self, qualified_name: str) -> _ClassDeclaration:
        module, _, name = qualified_name.rpartition(".")  # __torch__.a.b.C is declared in code/__torch__/a/b.py
        if module not in self._files:
            self._files[module] = self._parse(f"{self._prefix}/code/{module.replace('.', '/')}.py")
        if name not in self._files[module]:
            raise TorchScriptError(f"class {qualified_name} is not declared in the archive's code; the archive is "
                                   f"corrupt")
        return self._files[module][name]

    def _parse(self, record: str) -> dict[str, _ClassDeclaration]:
        try:
            tree = ast.parse(self._archive.read(record).decode("utf-8"), filename=record)
        except KeyError:
            raise TorchScriptError(f"the archive has no record {record} declaring its classes") from None
        except (SyntaxError, ValueError, RecursionError) as e:
            raise TorchScriptError(f"{record} is not TorchScript's printed code ({e})") from e
        return {node.name: _declaration(node, record) for node in tree.body if isinstance(node, ast.ClassDef)}


def _add_module_tensors(module: _ScriptObject, declarations: _Declarations, prefix: str,
                        out: dict[str, torch.Tensor], parents: frozenset[int]) -> None:
    """``module``'s parameters, then its buffers, then its submodules', in attribute order as ``state_dict`` has."""
    declaration = declarations[module.qualified_name]
    if declaration.has_setstate:
        raise TorchScriptError(
            f"refusing to load it: its class {module.qualified_name} defines __setstate__, code that torch.jit.load "
            f"would run while loading, and without running it the weights cannot be told apart. Re-save them with "
            f"torch.save(model.state_dict()) or safetensors")
    state = module.state
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise TorchScriptError(f"the pickled state of {module.qualified_name} is not a module's attributes; the "
                               f"archive is corrupt")
    if id(module) in parents:
        raise TorchScriptError(f"module {module.qualified_name} contains itself; the archive is corrupt")
    for names in (declaration.parameters, declaration.buffers):
        out.update((prefix + k, v) for k, v in state.items() if k in names and isinstance(v, torch.Tensor))
    for k, v in state.items():
        if isinstance(v, _ScriptObject) and declarations[v.qualified_name].is_module:
            _add_module_tensors(v, declarations, f"{prefix}{k}.", out, parents | {id(module)})


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    found = [n[:-len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        raise TorchScriptError(f"expected one <name>/data.pkl record in the TorchScript archive, found {len(found)} "
                               f"(archives from before PyTorch 1.4 are not supported)")
    byteorder = f"{found[0]}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).decode("ascii", "replace") != sys.byteorder:
        raise TorchScriptError(f"its tensors are stored {archive.read(byteorder)!r}-endian, unlike this machine")
    return found[0]


def read_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, keys and order as ``torch.jit.load(path).state_dict()``.

    Tensors come back on the CPU without ``requires_grad``. No code of the archive runs: anything but tensors and
    module attributes, or a module with a scripted ``__setstate__``, raises ``TorchScriptError``.
    """
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        root = _DataUnpickler(archive, prefix).load()
        if not isinstance(root, _ScriptObject):
            raise TorchScriptError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
        declarations = _Declarations(archive, prefix)
        if not declarations[root.qualified_name].is_module:
            raise TorchScriptError(f"data.pkl holds a {root.qualified_name}, not a TorchScript module")
        state_dict: dict[str, torch.Tensor] = {}
        _add_module_tensors(root, declarations, "", state_dict, frozenset())
    return state_dict
