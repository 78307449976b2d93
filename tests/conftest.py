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
