"""A pytest plugin (``-p rlengine_patch_report``) for running veRL's own tests with the patch
that the verl plugin applied (RLENGINE_VERL=1): it fails the run where no patch is on and
prints which path each part's calls took, for tests/test_integrations.py to read."""

import pytest


def pytest_configure(config):
    import verl  # noqa: F401  (loads the verl.plugins entry points)

    from rlengine.integrations import verl_plugin

    if verl_plugin.PATCH is None:
        raise pytest.UsageError("rlengine_patch_report: RLENGINE_VERL is not set: no patch")


def pytest_terminal_summary(terminalreporter):
    from rlengine.integrations import verl_plugin

    for part in sorted({shim.part for shim in verl_plugin.PATCH.shims.values()}):
        calls = verl_plugin.PATCH.calls(part)
        terminalreporter.write_line(f"rlengine verl patch: {part} rlengine={calls['rlengine']} "
                                    f"original={calls['original']}")
