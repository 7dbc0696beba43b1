import sys, os
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    """Where the tests that take a device put the engine: DOMEX_DEVICE (tools/accelerator_check.sh sets cuda), else cpu."""
    return os.environ.get("DOMEX_DEVICE", "cpu")
