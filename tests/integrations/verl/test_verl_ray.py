"""The plugin hook reaches Ray workers: a local Ray cluster on the CPU whose workers get
RLENGINE_VERL=1 through the runtime environment, as a veRL job would pass it."""

import pytest

ray = pytest.importorskip("ray")


def test_a_ray_worker_that_imports_verl_runs_the_engines_gae():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RLENGINE_VERL": "1"}})
    try:
        @ray.remote
        def worker_gae():
            import torch
            import verl.trainer.ppo.core_algos as core_algos

            from rlengine.integrations import verl_plugin

            rewards, values = torch.randn(4, 32), torch.randn(4, 32)
            mask = torch.ones(4, 32, dtype=torch.int64)
            core_algos.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
            return repr(core_algos.compute_gae_advantage_return), dict(verl_plugin.PATCH.calls())

        name, calls = ray.get(worker_gae.remote(), timeout=300)
    finally:
        ray.shutdown()
    assert name.startswith("<rlengine shim of verl.trainer.ppo.core_algos"), name
    assert calls.get("rlengine", 0) >= 1, calls
