"""keye-dsa test setup: Triton kernels run in the interpreter when there is no GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def force_impl(monkeypatch):
    """``force_impl("triton" | "reference")`` pins the dispatcher for the rest of the test."""

    def _force(name: str) -> None:
        monkeypatch.setenv("KEYE_DSA_IMPL", name)

    return _force


def pytest_configure(config):
    # triton's interpreter converts 1-element arrays to Python ints, which numpy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim:DeprecationWarning")
    # masked-off lanes (empty slots) overflow in the interpreter's numpy math before tl.where drops them
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
