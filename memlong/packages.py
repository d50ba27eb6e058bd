"""Where installed data and weight packages live. No torch here: the command line and the data helpers
use it without loading the model stack."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from memlong.errors import ModelUnavailable

# Files shipped inside this package (package data: in the wheel and the image, not only a checkout).
SHIPPED = Path(__file__).resolve().parent
ADAPTERS_DIR = SHIPPED / "adapters"  # trained MemLong adapters, one directory each (adapters/README.md)
ICL_DATA_DIR = SHIPPED / "eval" / "icl_data"  # sst-2/, mr/, sst-5/, subj/ for `memlong eval icl`


def package_dir(package: str, install_hint: str) -> Path:
    """Directory of an installed package, or ModelUnavailable saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the Python package '{package}' is not installed; install it with: {install_hint}"
        )
    return Path(next(iter(spec.submodule_search_locations)))
