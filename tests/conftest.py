"""One torch thread for every test: the test models are tiny (one thread is fastest for them) and the 2-core machine
runs the suite; the previous count is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
