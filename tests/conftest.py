import os
import sys

import pytest

# The benchmarks' shared machinery (benchmarks/harness/) is imported as the scripts there
# import it: with benchmarks/ on the path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

# Tests build everything from random weights and generated data: never download.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(os.path.dirname(__file__), "_no_datasets"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="torch-xla not installed (run `make test-xla`)")
        for item in items:
            if "xla" in item.keywords:
                item.add_marker(skip)
