"""Shared test set-up: compute on one thread beside the copy engine, as the runtime does."""

import os

import pytest
import torch

torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA or ROCm device"))


os.environ.setdefault("RESIDENCY_TEST", "1")


@pytest.fixture(scope="module")
def one_compute_thread():
    """One intra-op thread, as the runtime computes beside its copy engine; 2 threads thrash when shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
