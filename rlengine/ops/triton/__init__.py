"""Triton kernels of rlengine's ops (GPU, or the CPU under Triton's interpreter).

Each module holds one op's kernels and the Python that launches them through
``torch.library.wrap_triton``; the op itself (``torch.library.triton_op``), its argument checks
and its autograd live in ``rlengine/ops/<family>.py``. Nothing here is imported until an op runs
on the Triton path, so ``import rlengine`` neither needs Triton nor fixes how Triton decorates
these kernels (Triton reads ``TRITON_INTERPRET`` when a kernel is decorated).
"""
