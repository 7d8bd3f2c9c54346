import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # tiny models: one thread is faster than two here, and immune to other processes on a small machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
