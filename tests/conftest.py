import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests draw fresh inputs on every run; the profile bounds their cost on 2 cores.
settings.register_profile(
    "rlengine",
    max_examples=int(os.environ.get("RLENGINE_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("rlengine")

# tests/integrations/<trainer>/ import the trainer: tests/test_integrations.py runs them inside
# that trainer's own virtual environment (RLENGINE_TRAINER_ENV set there).
collect_ignore = [] if os.environ.get("RLENGINE_TRAINER_ENV") else ["integrations"]


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets its own fresh seed, printed on failure so that it can be replayed."""
    seed = int(os.environ.get("RLENGINE_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        seeds = [v for k, v in item.user_properties if k == "torch_seed"]
        if seeds:
            item.add_report_section("call", "seed", f"RLENGINE_TEST_SEED={seeds[0]}")
