"""Fingerprints of what determines a network's numbers, for refusing to mix two kernels.

``repr(net)`` is not such a fingerprint: two lambdas, two ``functools.partial`` objects with
different arguments, a function edited between runs, a different ``derivative=`` and a
custom layer whose ``repr`` omits its state all print alike. :func:`fingerprint` instead walks
the object graph and hashes the values that feed the computation:

* numbers exactly (floats by ``float.hex``), strings, ``None``, containers element by element;
* tensors and arrays by dtype, shape and bytes;
* ntkit layers and other plain objects by class and every instance attribute (``__dict__``
  and ``__slots__``), recursively (nested layers, tuples of layers, ...);
* Python functions by qualified name **and** their code: the bytecode, constants (nested code
  objects too), names, defaults, keyword defaults, closure cell contents and the current
  values of the globals the code reads (recursively: a helper function is hashed by its code,
  a module by its name);
* ``functools.partial`` by function, arguments and keywords; bound methods by function and
  instance; ``lru_cache`` wrappers by the wrapped function;
* functions, builtins, ufuncs and classes of the numerical libraries (torch, numpy, scipy,
  math, ...) by qualified name and the library's version: their code is the library's;
* classes defined outside those libraries and outside ntkit by name plus the code of the
  attributes they define (so an edited ``kernel_map`` of a user layer is seen); ntkit's own
  classes by name and ntkit's version;
* ``torch.nn.Module`` instances by class, ``repr`` (memory addresses masked), public
  attributes, children and ``state_dict`` bytes.

An object may define ``__ntkit_fingerprint__(self)`` returning a describable value that
replaces the attribute walk (for a layer holding lazily filled caches, which would otherwise
make two equal layers look different).

Anything else (an object without describable state, such as a C-extension callable that is
not a named module-level function, a generator, a lock, a ``torch.Generator``) makes the
fingerprint *opaque*: the digest is still computed, but it cannot prove that two networks
compute the same numbers, and :attr:`Fingerprint.opaque` says which object was the problem.

Limits: the fingerprint sees the state reachable from the network when it is taken. It does
not see code that a function reaches through attributes of modules (``mymodule.helper``: the
module is hashed by name), nor changes inside the numerical libraries beyond their version
string, nor randomness drawn at call time. Equal fingerprints across processes need the
same Python version (bytecode is compared).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import re
import sys
import types
from typing import Any

import numpy as np
import torch

#: Top-level packages whose functions and classes are identified by name and version.
_LIBRARIES = frozenset({
    "builtins", "math", "cmath", "operator", "_operator", "functools", "_functools",
    "itertools", "numpy", "scipy", "torch", "sklearn", "jax", "jaxlib", "dataclasses",
    "enum", "typing", "abc", "collections", "copy", "re",
})
_DESCRIPTORS = (types.MethodDescriptorType, types.WrapperDescriptorType,
                types.ClassMethodDescriptorType, types.GetSetDescriptorType,
                types.MemberDescriptorType)
_MAX_NODES = 200_000  # a bigger graph is a user's dataset in a global, not a network
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
# Class attributes that are bookkeeping, not behaviour.
_SKIPPED_CLASS_ATTRS = frozenset({
    "__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__annotations__",
    "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__slots__",
    "__parameters__", "__orig_bases__", "__abstractmethods__", "_abc_impl",
    "__firstlineno__", "__static_attributes__", "__hash__",
})


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A sha256 digest, and, when the walk met something it cannot describe, why.

    ``opaque`` is ``None`` for a complete fingerprint, else a sentence naming the first
    object (by its path from the root, e.g. ``net.layers[1]._fn``) that could not be
    described.
    """

    digest: str
    opaque: str | None = None


def fingerprint(obj: Any, root: str = "net") -> Fingerprint:
    """Fingerprint ``obj`` (a network, a function, any value); see the module docstring."""
    walker = _Walker()
    try:
        digest = walker.describe(obj, root)
    except RecursionError:
        return Fingerprint(hashlib.sha256(b"recursion").hexdigest(),
                           f"{root} is nested too deeply to fingerprint")
    opaque = walker.opaque[0] if walker.opaque else None
    return Fingerprint(digest.hex(), opaque)


def _top_package(module: Any) -> str:
    return str(module or "").split(".", 1)[0]


def _library_version(top: str) -> str:
    mod = sys.modules.get(top)
    return str(getattr(mod, "__version__", ""))


def _ntkit_version() -> str:
    mod = sys.modules.get("ntkit")
    return str(getattr(mod, "__version__", ""))


class _Walker:
    def __init__(self) -> None:
        self.memo: dict[int, bytes] = {}
        self.active: set[int] = set()
        self.keep: list[Any] = []  # keeps memoised objects alive so that ids stay unique
        self.opaque: list[str] = []
        self.nodes = 0

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _hash(tag: str, *parts: bytes) -> bytes:
        h = hashlib.sha256()
        h.update(tag.encode())
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()

    def _opaque(self, path: str, why: str) -> bytes:
        self.opaque.append(f"{path} ({why})")
        return self._hash("opaque", why.encode())

    def _many(self, tag: str, items: Any, path: str) -> bytes:
        return self._hash(tag, *(self.describe(v, f"{path}[{i}]") for i, v in enumerate(items)))

    # ----------------------------------------------------------------- dispatch
    def describe(self, obj: Any, path: str) -> bytes:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            if self.nodes == _MAX_NODES + 1:
                return self._opaque(path, f"more than {_MAX_NODES} objects reachable")
            return self._hash("truncated")
        # Values: no identity, no memo.
        if obj is None or isinstance(obj, (bool, int, str, bytes)):
            return self._hash("value", type(obj).__name__.encode(), repr(obj).encode())
        if isinstance(obj, float):
            return self._hash("float", float.hex(obj).encode())
        if isinstance(obj, complex):
            return self._hash("complex", float.hex(obj.real).encode(), float.hex(obj.imag).encode())
        if isinstance(obj, np.generic):
            return self._hash("npscalar", str(obj.dtype).encode(), np.asarray(obj).tobytes())
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return self._hash("torchvalue", str(obj).encode())
        if isinstance(obj, np.dtype):
            return self._hash("npdtype", str(obj).encode())
        if isinstance(obj, enum.Enum):
            return self._hash("enum", self.describe(type(obj), path), obj.name.encode())
        if isinstance(obj, (tuple, list)):
            return self._hash(type(obj).__name__, self._many("items", obj, path))
        if isinstance(obj, dict):
            return self._hash("dict", *(self._hash("item", self.describe(k, f"{path}.keys()"),
                                                   self.describe(v, f"{path}[{k!r}]"))
                                        for k, v in obj.items()))
        if isinstance(obj, (set, frozenset)):
            parts = sorted(self.describe(v, f"{path}{{}}") for v in obj)
            return self._hash("set", *parts)
        if isinstance(obj, types.ModuleType):
            return self._hash("module", obj.__name__.encode())
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return self._hash("objarray", str(obj.shape).encode(),
                                  self._many("items", obj.ravel().tolist(), path))
            arr = np.ascontiguousarray(obj)
            return self._hash("ndarray", str(arr.dtype).encode(), str(arr.shape).encode(),
                              arr.tobytes())
        if isinstance(obj, types.CodeType):
            return self._code(obj, path)
        # Objects with identity: memoised by id (a shared object is hashed once) and guarded
        # against cycles.
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        if key in self.active:
            return self._hash("cycle", type(obj).__qualname__.encode())
        self.active.add(key)
        try:
            digest = self._identity(obj, path)
        finally:
            self.active.discard(key)
        self.memo[key] = digest
        self.keep.append(obj)
        return digest

    def _identity(self, obj: Any, path: str) -> bytes:
        hook = getattr(type(obj), "__ntkit_fingerprint__", None)
        if hook is not None and not isinstance(obj, type):
            return self._hash("hook", self.describe(type(obj), path),
                              self.describe(hook(obj), f"{path}.__ntkit_fingerprint__()"))
        if isinstance(obj, type):
            return self._class(obj, path)
        if isinstance(obj, functools.partial):
            return self._hash("partial", self.describe(obj.func, f"{path}.func"),
                              self.describe(obj.args, f"{path}.args"),
                              self.describe(obj.keywords, f"{path}.keywords"),
                              self.describe(getattr(obj, "__dict__", {}), f"{path}.__dict__"))
        if isinstance(obj, types.MethodType):
            return self._hash("method", self.describe(obj.__func__, f"{path}.__func__"),
                              self.describe(obj.__self__, f"{path}.__self__"))
        if isinstance(obj, (staticmethod, classmethod)):
            return self._hash(type(obj).__name__, self.describe(obj.__func__, path))
        if isinstance(obj, property):
            return self._hash("property", self.describe(obj.fget, f"{path}.fget"),
                              self.describe(obj.fset, f"{path}.fset"))
        if isinstance(obj, types.FunctionType):
            return self._function(obj, path)
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            return self._builtin(obj, path)
        if isinstance(obj, _DESCRIPTORS):  # ``torch.Tensor.tanh``, ``str.upper``, slots
            owner = getattr(obj, "__objclass__", None)
            return self._hash("descriptor", self.describe(owner, f"{path}.__objclass__"),
                              str(getattr(obj, "__name__", "")).encode())
        if isinstance(obj, types.MethodWrapperType):  # ``(2.0).__mul__``
            return self._hash("methodwrapper", self.describe(obj.__self__, f"{path}.__self__"),
                              obj.__name__.encode())
        if isinstance(obj, np.ufunc):
            return self._hash("ufunc", obj.__name__.encode(), _library_version("numpy").encode())
        if isinstance(obj, types.CellType):
            try:
                contents = obj.cell_contents
            except ValueError:
                return self._hash("emptycell")
            return self._hash("cell", self.describe(contents, path))
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None and type(obj).__name__ == "_lru_cache_wrapper":
            return self._hash("lru_cache", self.describe(wrapped, f"{path}.__wrapped__"))
        if isinstance(obj, torch.nn.Module):
            return self._module(obj, path)
        return self._object(obj, path)

    # ----------------------------------------------------------------- kinds
    def _tensor(self, t: torch.Tensor, path: str) -> bytes:
        try:
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        except Exception as err:  # sparse, meta, quantized...: no plain bytes to hash
            return self._opaque(path, f"a {t.layout} tensor whose bytes cannot be read: {err}")
        return self._hash("tensor", str(t.dtype).encode(), str(tuple(t.shape)).encode(), data)

    def _code(self, code: types.CodeType, path: str) -> bytes:
        consts = []
        for c in code.co_consts:
            consts.append(self._code(c, path) if isinstance(c, types.CodeType)
                          else self.describe(c, f"{path}.__code__.co_consts"))
        # Line numbers and file names are left out: moving a function does not change it.
        return self._hash("code", code.co_code, *consts,
                          repr((code.co_names, code.co_varnames, code.co_freevars,
                                code.co_cellvars, code.co_argcount, code.co_posonlyargcount,
                                code.co_kwonlyargcount, code.co_flags)).encode())

    @staticmethod
    def _global_names(code: types.CodeType) -> list[str]:
        names = list(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                names.extend(_Walker._global_names(c))
        return sorted(set(names))

    def _function(self, fn: types.FunctionType, path: str) -> bytes:
        module = getattr(fn, "__module__", None)
        name = f"{module}.{fn.__qualname__}".encode()
        top = _top_package(module)
        if top in _LIBRARIES:
            return self._hash("libfunction", name, _library_version(top).encode())
        parts = [name, self._code(fn.__code__, path),
                 self.describe(fn.__defaults__, f"{path}.__defaults__"),
                 self.describe(fn.__kwdefaults__, f"{path}.__kwdefaults__")]
        for i, cell in enumerate(fn.__closure__ or ()):
            parts.append(self.describe(cell, f"{path}.__closure__[{i}]"
                                       f" ({fn.__code__.co_freevars[i]})"))
        g = fn.__globals__
        for gname in self._global_names(fn.__code__):
            if gname in g:
                parts.append(self._hash("global", gname.encode(),
                                        self.describe(g[gname], f"{path}.__globals__[{gname!r}]")))
        if vars(fn):  # attributes set on the function, e.g. functools.wraps' __wrapped__
            parts.append(self.describe(dict(vars(fn)), f"{path}.__dict__"))
        return self._hash("function", *parts)

    def _builtin(self, fn: Any, path: str) -> bytes:
        owner = getattr(fn, "__self__", None)
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", getattr(fn, "__name__", ""))
        name = f"{module}.{qualname}".encode()
        if owner is None or isinstance(owner, (types.ModuleType, type)):
            if not qualname:
                return self._opaque(path, f"an unnamed builtin {fn!r}")
            top = _top_package(module if module else getattr(owner, "__name__", ""))
            return self._hash("builtin", name, _library_version(top).encode())
        # A builtin bound to an instance (``tensor.add``, ``[].append``): the instance matters.
        return self._hash("boundbuiltin", name, self.describe(owner, f"{path}.__self__"))

    def _class(self, cls: type, path: str) -> bytes:
        name = f"{cls.__module__}.{cls.__qualname__}".encode()
        top = _top_package(cls.__module__)
        if top in _LIBRARIES:
            return self._hash("libclass", name, _library_version(top).encode())
        if top == "ntkit":
            return self._hash("ntkitclass", name, _ntkit_version().encode())
        parts = [name]
        for base in cls.__mro__:
            if base is cls:
                for attr in sorted(cls.__dict__):
                    if attr in _SKIPPED_CLASS_ATTRS or attr.startswith("_abc_"):
                        continue
                    parts.append(self._hash("attr", attr.encode(), self.describe(
                        cls.__dict__[attr], f"{path}.{attr}")))
            elif base is not object:
                parts.append(self.describe(base, f"{path}.__mro__"))
        return self._hash("class", *parts)

    def _module(self, mod: torch.nn.Module, path: str) -> bytes:
        parts = [self.describe(type(mod), path),
                 _ADDRESS.sub("0x?", repr(mod)).encode()]
        public = {k: v for k, v in sorted(vars(mod).items()) if not k.startswith("_")}
        parts.append(self.describe(public, path))
        for name, child in mod.named_children():
            parts.append(self._hash("child", name.encode(), self.describe(child, f"{path}.{name}")))
        for name, value in mod.state_dict(keep_vars=True).items():
            parts.append(self._hash("state", name.encode(),
                                    self._tensor(value, f"{path}.state_dict()[{name!r}]")
                                    if isinstance(value, torch.Tensor)
                                    else self.describe(value, f"{path}.state_dict()[{name!r}]")))
        return self._hash("nnmodule", *parts)

    def _object(self, obj: Any, path: str) -> bytes:
        state: dict[str, Any] = {}
        has_state = False
        if hasattr(obj, "__dict__"):
            has_state = True
            state.update(vars(obj))
        for base in type(obj).__mro__:
            slots = base.__dict__.get("__slots__", ())
            slots = (slots,) if isinstance(slots, str) else slots
            for slot in slots:
                if slot in ("__dict__", "__weakref__"):
                    continue
                has_state = True
                try:
                    state[slot] = getattr(obj, slot)
                except AttributeError:
                    continue
        if not has_state:
            kind = type(obj)
            return self._opaque(path, f"a {kind.__module__}.{kind.__qualname__} object with "
                                      "no describable state")
        parts = [self.describe(type(obj), path)]
        for attr in sorted(state):
            parts.append(self._hash("attr", attr.encode(),
                                    self.describe(state[attr], f"{path}.{attr}")))
        return self._hash("object", *parts)
