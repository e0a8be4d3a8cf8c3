import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """CI shares 2 cores among test processes; one thread also keeps float reductions in a fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
