"""MNIST-1D, generated locally: the learned optimizer's main task.

MNIST-1D (Greydanus & Kobak, the ``mnist1d`` package, Apache-2.0) turns ten 12-point
templates into 40-point signals by padding, shear, scaling, translation and correlated plus
i.i.d. noise. :func:`mnist1d_split` calls its ``make_dataset`` with its default
transformations and our sizes, so **nothing is downloaded** (``get_dataset``, which fetches
the authors' 5,000-sample pickle, is never called). Why generated and large: with the
default 4,000 training samples (or sklearn digits' 1,437 images) a 40→32→10 MLP overfits
inside the benchmark's budget, and "the first step below Adam's best" then measures where a
noisy curve happens to bottom out (issue 29).

Generation costs ~45 s on one core for 60,000 samples, so the tensors are cached under
:func:`gradgraph_lab.data.cache.default_cache_root` (``mnist1d-<config hash>.pt``, written
atomically). ``make_dataset`` seeds numpy's and Python's global random streams; both are
restored afterwards, so generating the data does not change any other random stream.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from gradgraph.errors import GradGraphError
from gradgraph.datasets.atomic import atomic_torch_save
from gradgraph_lab.data.cache import config_hash, default_cache_root

__all__ = ["MNIST1D_TEST", "MNIST1D_TRAIN", "generate_mnist1d", "mnist1d_split"]

#: training and test samples of the benchmark's MNIST-1D (issue 29: "e.g. 50k train / 10k test").
MNIST1D_TRAIN = 50_000
MNIST1D_TEST = 10_000


def generate_mnist1d(num_train: int, num_test: int, seed: int = 42) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate MNIST-1D with ``mnist1d.data.make_dataset`` (no network, no file).

    Args:
        num_train, num_test: sample counts; ``num_train + num_test`` must be a multiple of 10
            (the generator draws the same number of samples per class).
        seed: the generator's seed (the package's default is 42).

    Returns:
        ``(x_train [num_train, 40] float32, y_train [num_train] int64, x_test [num_test, 40], y_test)``,
        standardised over the whole set as the package does.

    Raises:
        GradGraphError: the counts are not positive or their sum is not a multiple of 10.
    """
    total = num_train + num_test
    if num_train < 1 or num_test < 1 or total % 10:
        raise GradGraphError(f"generate_mnist1d needs positive counts summing to a multiple of 10, got "
                             f"{num_train} + {num_test}")
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = total
    args.train_split = num_train / total
    args.seed = seed
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x_train = torch.as_tensor(data["x"], dtype=torch.float32)
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32)
    y_train = torch.as_tensor(data["y"], dtype=torch.long)
    y_test = torch.as_tensor(data["y_test"], dtype=torch.long)
    if len(y_train) != num_train or len(y_test) != num_test:  # the split is int(total * train_split)
        raise GradGraphError(f"generate_mnist1d: got {len(y_train)} + {len(y_test)} samples, "
                             f"asked {num_train} + {num_test}")
    return x_train, y_train, x_test, y_test


@lru_cache(maxsize=2)
def mnist1d_split(num_train: int = MNIST1D_TRAIN, num_test: int = MNIST1D_TEST,
                  cache_root: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The benchmark's MNIST-1D, from the on-disk cache or generated (then cached).

    Args:
        num_train, num_test: sample counts (:func:`generate_mnist1d`).
        cache_root: cache directory (default :func:`~gradgraph_lab.data.cache.default_cache_root`).

    Returns:
        ``(x_train [num_train, 40], y_train, x_test [num_test, 40], y_test)``.
    """
    config = {"dataset": "mnist1d", "generator": "mnist1d.make_dataset", "num_train": num_train,
              "num_test": num_test, "seed": 42}
    path = Path(cache_root or default_cache_root()) / f"mnist1d-{config_hash(config)}.pt"
    if path.exists():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["config"] == config:
                return stored["x_train"], stored["y_train"], stored["x_test"], stored["y_test"]
        except Exception:  # noqa: BLE001 - a damaged cache file is regenerated, never trusted
            pass
    x_train, y_train, x_test, y_test = generate_mnist1d(num_train, num_test)
    atomic_torch_save(path, {"config": config, "x_train": x_train, "y_train": y_train, "x_test": x_test,
                             "y_test": y_test})
    return x_train, y_train, x_test, y_test
