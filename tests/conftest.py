"""Suite-wide settings."""

from __future__ import annotations

import os

import torch

# `pytest -n 2` runs two workers on a 2-core machine; letting each also start one torch
# thread per core oversubscribes the CPU and makes every test slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
