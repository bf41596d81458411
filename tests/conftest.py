"""Every test runs at one intra-op thread, whichever files pytest collects: the tiny models' few-step
trajectories (and so what they detect) depend on float summation order, which changes with the thread count.
A full run already ran at one thread (test_lightning.py sets it on import); a single file now runs the same."""

import torch

torch.set_num_threads(1)
