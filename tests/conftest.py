"""Fixtures shared by several test files."""
import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from pipeline import threads

ROOT = Path(__file__).resolve().parents[1]

# A suite started in the background by a script (`pytest &`, `nohup pytest &`) inherits SIGINT ignored, as POSIX
# shells start background jobs, and every command a test starts would inherit that too: the tests that press
# Ctrl-C on a command would wait on it in vain. They test what a terminal's Ctrl-C does, so SIGINT is handled
# here, as in a foreground pytest; a handled signal is back to its default in every command started from here.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def session_outside_the_checkout(tmp_path_factory):
    """The working directory of the whole session is a fresh temporary one, so that module fixtures too, and
    any command run with its default paths, never see the user's out_models/, shards/ or runs/."""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def outside_the_checkout(tmp_path, monkeypatch):
    """Each test runs in its own temporary directory (subprocesses inherit it: they run `ROOT/cli.py` from
    there), so that no test reads or writes the user's out_models/, shards/ or runs/ in the checkout, where a
    user's own training may be writing while the suite runs."""
    monkeypatch.chdir(tmp_path)


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


@pytest.fixture(scope="session")
def load_lab_script():
    """Loads a lab script of docs/experiments/ as a module, registered in sys.modules (a dataclass in it
    resolves its annotations through there); the caller removes it with sys.modules.pop(name)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "docs" / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return load
