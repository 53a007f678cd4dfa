"""Tests import the method files from the repo root and run on the CPU with a fixed thread count.

One thread: the tiny models gain nothing from a second, and when other jobs share the two cores,
two OpenMP threads waiting on each other made single tests 10-100x slower (0.5 s became 50 s).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
