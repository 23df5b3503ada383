"""Fixtures shared by several test files."""
import os

import pytest
import torch

from pipeline import threads


@pytest.fixture(autouse=True)
def restore_thread_policy():
    """Commands run in-process (run_cli) apply the thread policy to this process: its environment (which every
    later subprocess inherits), torch's thread count and what `applied()` reports. Put all three back, so that
    no test sees the policy an earlier one chose for whatever load the machine had then."""
    environ, torch_threads, applied = dict(os.environ), torch.get_num_threads(), threads.applied()
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(torch_threads)
    threads._applied.clear()
    threads._applied.update(applied)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's in-process decoding: steadier beside other jobs on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
