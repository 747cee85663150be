"""Fixtures shared by the trainer's tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its models are tiny (one thread runs them fastest, unslowed on a
    busy machine), and its subprocesses run with OMP_NUM_THREADS=1, so all runs compute alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
