"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture()
def float64():
    """Run a test with float64 as torch's default dtype, restoring the previous default afterwards.

    Modules that need it declare ``pytestmark = pytest.mark.usefixtures("float64")``; setting the
    default at import time would leak into every test module collected later.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread: tiny models run faster single-threaded, and much
    faster when other jobs share the CPU. Modules declare ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
