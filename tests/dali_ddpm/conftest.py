"""One intra-op thread: the test models are tiny, and on a shared 2-core machine two threads mostly wait on each other."""

import torch

torch.set_num_threads(1)
