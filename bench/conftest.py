import platform

import pytest
import torch

import rlengine
from rlengine import _extension


def pytest_report_header(config):
    return (f"rlengine {rlengine.__version__} ({_extension.library_path()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and threading recorded with every result file."""
    machine_info["versions"] = {
        "rlengine": rlengine.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel": platform.release(),
    }


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
