import os

import pytest
import torch

# Nothing in the test suite may touch the hub: with this set, a stray hub id fails at once instead of
# hanging in retries for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core box spinning threads cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
