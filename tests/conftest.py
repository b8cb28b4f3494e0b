import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run ~10× faster on one thread when the 2 cores are shared (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
