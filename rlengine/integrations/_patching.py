"""Replacing a trainer's functions with the engine's, and putting them back.

A trainer's function lives in its defining module and, through ``from x import f``, in every
module that bound it by name at import. Replacing only the defining module's attribute misses
those copies; so a part is applied by finding every module in ``sys.modules`` whose attribute
*is* the original object and rebinding it there too. Modules imported later read the defining
module's (replaced) attribute. ``Patch.revert`` restores exactly the bindings it changed.

A shim keeps its original and falls back to it for any call outside what the engine's op
covers (a device without a kernel, a dtype, a mask that is not 0/1, non-finite inputs whose
propagation the original defines, ...), counting which path ran in ``Shim.calls``.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.metadata
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# The attribute a shim carries so that a second apply() recognises it and leaves it alone.
_ORIGINAL = "__rlengine_original__"
_lock = threading.Lock()


class Shim:
    """The engine's version of one trainer function: ``fast(*args, **kwargs)`` returns the
    result, or ``FALLBACK`` when the call is outside what it covers, in which case the original
    runs. ``calls`` counts both paths ("rlengine" and "original")."""

    FALLBACK = object()

    def __init__(self, original: Callable, fast: Callable, part: str) -> None:
        self.original = original
        self.fast = fast
        self.part = part
        self.calls: collections.Counter[str] = collections.Counter()
        functools.update_wrapper(self, original)
        setattr(self, _ORIGINAL, original)

    def __call__(self, *args, **kwargs):
        result = self.fast(*args, **kwargs)
        if result is Shim.FALLBACK:
            self.calls["original"] += 1
            return self.original(*args, **kwargs)
        self.calls["rlengine"] += 1
        return result

    def __repr__(self) -> str:
        return f"<rlengine shim of {self.original.__module__}.{self.original.__qualname__}>"


@dataclass(frozen=True)
class Replacement:
    """One function of a trainer: ``module.name`` is replaced by ``Shim(original,
    make_fast(original), part)``."""

    part: str
    module: str
    name: str
    make_fast: Callable[[Callable], Callable]


@dataclass
class Patch:
    """What one ``apply`` changed. ``revert()`` puts every binding back (idempotent); a Patch is
    also a context manager that reverts on exit."""

    trainer: str
    shims: dict[str, Shim] = field(default_factory=dict)  # "module.name" -> shim
    _bindings: list[tuple[object, str, object, object]] = field(default_factory=list)

    def calls(self, part: str | None = None) -> collections.Counter[str]:
        """How often the engine's path and the original ran, over the shims of ``part`` (all
        parts if None)."""
        total: collections.Counter[str] = collections.Counter()
        for shim in self.shims.values():
            if part is None or shim.part == part:
                total.update(shim.calls)
        return total

    def revert(self) -> None:
        with _lock:
            for owner, name, original, shim in reversed(self._bindings):
                if getattr(owner, name, None) is shim:
                    setattr(owner, name, original)
            self._bindings.clear()
            # modules imported while the patch was on bound the shim by name: restore them too
            for shim in self.shims.values():
                for owner, name in _bindings_of(shim):
                    setattr(owner, name, shim.original)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def check_version(distribution: str, package: str, low: str, high: str) -> str:
    """The installed version of ``distribution``; a clear ImportError where the package is not
    importable, a warning where its version is outside ``[low, high)``, the range tested."""
    from packaging.version import Version

    try:
        importlib.import_module(package)
    except ImportError as error:
        raise ImportError(f"rlengine.integrations.{package}: {distribution} is not importable "
                          f"({error}); install {distribution}>={low},<{high}") from error
    version = importlib.metadata.version(distribution)
    if not Version(low) <= Version(version) < Version(high):
        warnings.warn(f"rlengine.integrations.{package} is tested with {distribution} "
                      f">={low},<{high}; this is {version}: the shims assume that range's "
                      f"semantics", stacklevel=3)
    return version


def choose_parts(trainer: str, known: tuple[str, ...], parts: dict[str, bool]) -> set[str]:
    """The parts an ``apply(**parts)`` call asks for: all of ``known`` by default; naming any
    part True selects only those named True."""
    unknown = sorted(set(parts) - set(known))
    if unknown:
        raise TypeError(f"rlengine.integrations.{trainer}.apply: unknown part(s) "
                        f"{', '.join(unknown)}; the parts are {', '.join(known)}")
    if any(parts.values()):
        return {name for name, on in parts.items() if on}
    return {name for name in known if parts.get(name, True)}


def apply_replacements(trainer: str, replacements: list[Replacement],
                       parts: set[str]) -> Patch:
    """Replace every chosen part in its defining module and in every imported module that bound
    the original by name. A binding that already holds a shim is left as it is (so applying
    twice changes nothing, and the first Patch still owns it)."""
    patch = Patch(trainer)
    with _lock:
        for replacement in replacements:
            if replacement.part not in parts:
                continue
            module = importlib.import_module(replacement.module)
            current = getattr(module, replacement.name)
            if hasattr(current, _ORIGINAL):
                continue
            shim = Shim(current, replacement.make_fast(current), replacement.part)
            patch.shims[f"{replacement.module}.{replacement.name}"] = shim
            for owner, name in _bindings_of(current):
                setattr(owner, name, shim)
                patch._bindings.append((owner, name, current, shim))
    return patch


def _bindings_of(original: object) -> Iterator[tuple[object, str]]:
    """Every (module, attribute) in sys.modules bound to ``original``."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                yield module, name

