import os

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(int(os.environ.get("INTERP_TRAIN_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Cached artefacts (e.g. the digit-manifold VAE) go to a temporary folder, never to ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("INTERP_TRAIN_CACHE", str(tmp_path_factory.mktemp("interp_train_cache")))
    yield
    mp.undo()
