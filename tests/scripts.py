"""Import a script that is not part of the package (benchmarks/*.py, configs/make_matrix.py)
by its path: ``from scripts import load_script``."""

import importlib.util

from helpers import ROOT


def load_script(relative_path: str):
    """The module at ROOT / relative_path, executed afresh."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
