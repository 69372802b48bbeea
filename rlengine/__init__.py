"""rlengine: a kernel-backed engine for RLHF.

`rlengine.ops` holds the fused kernels (registered as ``torch.ops.rlengine.*``) behind typed
Python functions; importing rlengine loads the compiled extension that provides them.
"""

# The extension first: rlengine.ops registers fake kernels and autograd for its ops.
from rlengine import _extension  # noqa: F401, I001
from rlengine import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
