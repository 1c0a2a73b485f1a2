import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    """Small random weights make denormals; flushing them keeps the tiny models fast."""
    previous = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)
