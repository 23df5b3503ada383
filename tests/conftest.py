"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's in-process decoding: steadier beside other jobs on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
