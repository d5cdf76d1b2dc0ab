import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 3` (README): one torch thread per worker, or the workers fight over the
    # cores; set before torch starts, so the subprocesses the tests launch (CLI runs, DDP)
    # inherit it and compute with the same thread count as the test that checks them.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # imported before this file: tell it directly
        sys.modules["torch"].set_num_threads(1)

import pytest  # noqa: E402

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA_DIR = Path(os.environ.get("MIXMASK_DATA", _DEFAULT_DATA))
CIFAR10_TARBALL = DATA_DIR / "cifar10_jpeg_q75.tar.gz"


@pytest.fixture
def cifar10_tarball() -> Path:
    """Real CIFAR-10 as an ImageFolder tarball of JPEGs (../shared/data or $MIXMASK_DATA)."""
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TARBALL}; set MIXMASK_DATA to the "
                    "folder holding cifar10_jpeg_q75.tar.gz")
    return CIFAR10_TARBALL
