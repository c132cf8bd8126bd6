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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "native_bf16: trains under bf16 autocast; skipped on a CPU without native bf16 matmul (AVX2 only), where it would take 30x longer",
    )


def pytest_collection_modifyitems(config, items):
    """A bf16 test on a CPU that emulates bf16 (no AVX512 / AMX) would both crawl (dali_ddpm's 200 bf16 steps: over 10
    minutes) and, through the engine, train in float32 (`axon_shared.training.native_bf16`): it is skipped, saying so."""
    from axon_shared.training import native_bf16

    if native_bf16(torch.device("cpu")):
        return
    skip = pytest.mark.skip(reason=f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matmul")
    for item in items:
        if "native_bf16" in item.keywords:
            item.add_marker(skip)
