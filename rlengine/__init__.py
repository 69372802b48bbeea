"""rlengine: a kernel-backed engine for RLHF.

`rlengine.ops` holds the fused kernels (registered as ``torch.ops.rlengine.*``) behind typed
Python functions; importing rlengine loads the compiled extension that provides them.
"""

from rlengine import (
    _extension,  # noqa: F401  (loads and registers the compiled kernels)
    ops,
)

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
