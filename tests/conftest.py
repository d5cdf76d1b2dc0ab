import functools
import os
from pathlib import Path

import pytest

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
