"""Loads rlengine's compiled extension, which registers every kernel as ``torch.ops.rlengine.*``.

The extension is required: without it rlengine has no kernels, so a missing build is an import
error that says how to build, never a silent fall-back to the Python references.
"""

from __future__ import annotations

import torch  # first: rlengine._C links against libtorch


def _build_help() -> str:
    try:
        from rlengine import _build_info

        built = f"it was built against torch {_build_info.TORCH_VERSION}, this is torch "
    except ImportError:
        built = "it must be built against the torch it runs with; this is torch "
    return f"""\
rlengine's compiled extension (rlengine._C) could not be imported: {built}{torch.__version__}.
Build it again, from the rlengine checkout:
    make install
or with pip, from the checkout or an sdist (it builds against the environment's torch):
    pip install --force-reinstall --no-deps --no-cache-dir <checkout or sdist>
(torch comes first; its CPU build: pip install torch==2.13.0+cpu --extra-index-url
https://download.pytorch.org/whl/cpu)"""


try:
    from rlengine import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(f"{_build_help()}\nOriginal error: {error}") from error


def library_path() -> str:
    """Path of the loaded shared library that holds the kernels."""
    return _C.__file__


def built_against() -> str:
    """The torch version the loaded extension was built against."""
    from rlengine import _build_info

    return _build_info.TORCH_VERSION


def has_kernel(op_name: str, dispatch_key: str = "CPU") -> bool:
    """Whether ``torch.ops.rlengine.<op_name>`` has a compiled kernel for ``dispatch_key``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rlengine::{op_name}", dispatch_key)
