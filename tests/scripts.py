"""Import a script that is not part of the package (benchmarks/*.py, configs/make_matrix.py)
by its path: ``from scripts import load_script``."""

import importlib.util
import sys

from helpers import ROOT


def load_script(relative_path: str):
    """The module at ROOT / relative_path, executed afresh."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    # Registered as importlib's recipe does: a dataclass in the script looks its module up.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
