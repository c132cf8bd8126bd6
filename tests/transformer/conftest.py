"""One torch thread per test process: the tests are tiny, and the machine is shared."""

import torch

torch.set_num_threads(1)
