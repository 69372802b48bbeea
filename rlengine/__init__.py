"""rlengine: a kernel-backed engine for RLHF.

`rlengine.ops` holds the fused kernels (registered as ``torch.ops.rlengine.*``) behind typed
Python functions; it loads the compiled extension that provides them. ``import rlengine`` alone
imports nothing heavy (the `rlengine` command's help answers without loading torch):
``rlengine.ops`` is imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]


def __getattr__(name: str):
    if name == "ops":
        import importlib

        return importlib.import_module("rlengine.ops")
    raise AttributeError(f"module 'rlengine' has no attribute {name!r}")
