"""veRL's plugin hook: ``import verl`` loads this module (entry point group "verl.plugins") in
every process, the Ray workers included. It patches only where the environment opts in, never
merely because rlengine is installed:

    RLENGINE_VERL=1                 every part of rlengine.integrations.verl
    RLENGINE_VERL=gae,whiten        those parts
    (unset, empty or 0)             nothing

``PATCH`` holds the applied patch (its ``calls()`` say which path ran), or None.
"""

from __future__ import annotations

import os

from rlengine.integrations._patching import Patch

ENVIRONMENT_VARIABLE = "RLENGINE_VERL"


def _apply_from_environment() -> Patch | None:
    setting = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if setting in ("", "0", "false", "no"):
        return None
    from rlengine.integrations import verl

    if setting in ("1", "true", "yes", "all"):
        return verl.apply()
    parts = [part.strip() for part in setting.split(",") if part.strip()]
    return verl.apply(**dict.fromkeys(parts, True))


PATCH = _apply_from_environment()
