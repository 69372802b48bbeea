"""Drop-in speedups inside other trainers: each submodule replaces one trainer's functions with
the engine's ops (``apply()`` / ``Patch.revert()``), matching the trainer's own semantics and
falling back to its code for any call the ops do not cover.

- ``rlengine.integrations.verl``: veRL 0.9 (GAE, masked statistics, whitening); in every
  process, Ray workers included, with ``RLENGINE_VERL=1`` (see ``verl_plugin``).
"""
