import os

# No test may reach a hub: everything loads from local files (the embedded MiniLM package).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Fresh seeds per test, and the backend left as the test found it."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # GPU cases live beside CPU ones; mark them so a CPU run says why they skip.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
