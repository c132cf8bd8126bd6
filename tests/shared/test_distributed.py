"""A 2-process torchrun (gloo, CPU) DDP step equals one process stepping on the combined batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.testing import assert_close

from axon_shared import load_checkpoint

WORKER = Path(__file__).with_name("_shared_ddp_worker.py")


def test_two_process_ddp_step_equals_single_process(tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt.config == {"world_size": 2}

    sys.path.insert(0, str(WORKER.parent))
    try:
        from _shared_ddp_worker import make_problem
    finally:
        sys.path.pop(0)
    model, x, y = make_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        assert_close(ckpt.tensors["model"][name], value, atol=1e-6, rtol=1e-6)
    assert not torch.equal(ckpt.tensors["model"]["0.weight"], make_problem()[0].state_dict()["0.weight"])  # it did step
