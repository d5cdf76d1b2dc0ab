import functools
import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (README): one torch thread per worker, or the workers fight over the
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


@pytest.fixture(scope="session", autouse=True)
def _curves_only_plots():
    """Pretraining's default ``train.plots=all`` ends each run with a second pass over the
    evaluation data, a t-SNE and a retrieval grid: about 3.5 s a run on a 2-core CPU, over
    the suite's many tiny pretraining runs several minutes of CI. The suite draws the
    curves only (the end-of-run plotting path still runs everywhere);
    tests/test_plots.py restores every plot (``write_plots.__wrapped__``) for its own."""
    from mixmask import plots

    write_plots = plots.write_plots

    @functools.wraps(write_plots)
    def curves_only(*args, **kwargs):
        kwargs["representation"] = False
        return write_plots(*args, **kwargs)

    plots.write_plots = curves_only
    yield
    plots.write_plots = write_plots
