import os

import pytest
import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(int(os.environ.get("INTERP_TRAIN_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
