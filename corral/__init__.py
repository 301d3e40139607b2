"""Corral: the whole Llama 3.2 stack in one Python package."""

import os

# torch's OpenMP workers otherwise spin-wait after every operator, holding cores that Corral's kernel
# threads (corral/engine/kernels/pool.c) and other processes need: a decode step measured 2.3x slower.
# libgomp reads this once, when torch loads, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
