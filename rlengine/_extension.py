"""Loads rlengine's compiled extension, which registers every kernel as ``torch.ops.rlengine.*``.

The extension is required: without it rlengine has no kernels, so a missing build is an import
error that says how to build, never a silent fall-back to the Python references.
"""

from __future__ import annotations

import torch  # noqa: F401  (rlengine._C links against libtorch, which must be loaded first)

_BUILD_HELP = """\
rlengine's compiled extension (rlengine._C) could not be imported.
Build it against the torch you run with, from the rlengine checkout:
    make install
or by hand:
    pip install scikit-build-core cmake ninja
    pip install --no-build-isolation -e .
(torch must be installed first; on a CPU-only machine: pip install torch==2.13.0)"""

try:
    from rlengine import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(f"{_BUILD_HELP}\nOriginal error: {error}") from error


def library_path() -> str:
    """Path of the loaded shared library that holds the kernels."""
    return _C.__file__


def has_kernel(op_name: str, dispatch_key: str = "CPU") -> bool:
    """Whether ``torch.ops.rlengine.<op_name>`` has a compiled kernel for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlengine::{op_name}", dispatch_key)
