"""Shared test set-up: compute on one thread beside the copy engine, as the runtime does."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA or ROCm device"))


os.environ.setdefault("RESIDENCY_TEST", "1")
os.environ.pop("COLUMNS", None)  # piped output follows $COLUMNS (commands.console): a developer's shell must not set it


def _library_loggers_on_the_real_stderr() -> None:
    """diffusers and transformers make their log handler at first use, on sys.stderr as it is then: first used
    inside a capsys test, the handler kept that test's closed capture and the next test's warning printed
    "--- Logging error --- Traceback …" (a test that asserts no traceback failed when run alone)."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            logging_module = __import__(module, fromlist=["get_logger"])
        except ImportError:
            continue
        logging_module.get_logger(module.split(".")[0])


_library_loggers_on_the_real_stderr()


def _isolated_cache() -> Path:
    """A cache of the session's own (XDG_CACHE_HOME) seeded with this machine's measured profiles: a test never
    reads, writes or discards the user's calibrated profiles (one whose base reads as changed to a test's
    profile was deleted), and the machine's profile is measured at most once per session, as before."""
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "residency"
    home = Path(tempfile.mkdtemp(prefix="residency-tests-"))
    (home / "residency").mkdir()
    for f in real.glob("profile-*.json"):
        shutil.copy2(f, home / "residency" / f.name)
    return home


_CACHE_HOME = _isolated_cache()
os.environ["XDG_CACHE_HOME"] = str(_CACHE_HOME)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def one_compute_thread():
    """One intra-op thread, as the runtime computes beside its copy engine; 2 threads thrash when shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
