"""The compiled extension is what runs: every op has a compiled CPU kernel, and CI cannot pass on
Python reference paths alone."""

import pathlib
import re

import pytest
import torch

import rlengine
from rlengine import _extension

SCHEMA_TABLE = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "registration.cpp"


def _defined_ops():
    text = SCHEMA_TABLE.read_text()
    return re.findall(r'm\.def\("(\w+)\(', text)


def test_extension_is_a_compiled_library():
    path = pathlib.Path(_extension.library_path())
    assert path.suffix == ".so" and path.exists()
    assert path.name.startswith("_C.")


def test_the_extension_says_which_torch_it_was_built_against():
    assert _extension.built_against() == torch.__version__


def test_schema_table_is_read():
    ops = _defined_ops()
    assert "token_logprobs" in ops and "gae" in ops and len(ops) == len(set(ops))


@pytest.mark.parametrize("op", _defined_ops())
def test_every_op_has_a_cpu_kernel(op):
    assert hasattr(torch.ops.rlengine, op)
    assert _extension.has_kernel(op, "CPU"), f"rlengine::{op} has no compiled CPU kernel"


@pytest.mark.parametrize("op", [o for o in _defined_ops() if not o.endswith("_backward")])
def test_every_forward_op_is_public_and_has_a_reference(op):
    from rlengine.ops import reference

    assert op in rlengine.ops.__all__, f"rlengine.ops does not export {op}"
    assert callable(getattr(reference, op)), f"reference.{op} is missing"
