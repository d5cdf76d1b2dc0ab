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
