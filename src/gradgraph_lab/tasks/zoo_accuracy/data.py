"""The zoos: small networks trained with sampled hyperparameters (:mod:`.recipe`), checkpointed
at several steps, as a :class:`gradgraph.datasets.ModelZoo` with their test accuracies.

Datasets (from packages only, nothing downloaded): scikit-learn's digits (1797 8x8 images,
pixels / 16; the first ``pool_size`` of a fixed shuffle are the training pool, the rest the test
set) and MNIST-1D (``mnist1d``'s generator run locally through
:func:`gradgraph_lab.tasks.learned_optimizer.mnist1d.mnist1d_split`; ``pool_size`` training and
``test_size`` test signals of length 40).

Zoo member ``i`` is checkpoint ``i % C`` of network ``i // C``; splits are made of whole networks
(a network's checkpoints never straddle them).

The graphs: every member converted on one probe batch (the first ``probe_size`` pool datapoints,
cross-entropy per datapoint), with ``y = [[test accuracy]]``. Cached by
:class:`~gradgraph.datasets.ModelZoo` under ``cache_root/zoo-accuracy-<config hash>``; a member
is trained only when its shard is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.datasets import ModelZoo
from gradgraph.errors import GradGraphError
from gradgraph_lab.data.cache import config_hash, default_cache_root
from gradgraph_lab.distributed import DistributedContext
from gradgraph_lab.tasks.zoo_accuracy.recipe import (
    INITS,
    OPTIMIZERS,
    build_network,
    held_out_accuracy,
    sample_recipe,
    train_network,
)

__all__ = ["DATASETS", "Digits", "DigitsZooConfig", "Images", "ZooConfig", "ZooData", "build_network",
           "held_out_accuracy", "load_digits_split", "load_images", "load_zoo", "sample_recipe", "train_network"]

DATASETS = ("digits", "mnist1d")
#: The recipe fields added after the first (digits MLP) zoo, at the values that zoo had: a
#: config holding them is hashed without them, so that zoo's caches stay valid.
_FIRST_ZOO = {"architecture": "mlp", "dataset": "digits", "optimizers": ("sgd",), "inits": ("default",),
              "dropout_range": (0.0, 0.0), "test_size": 0}


@dataclass(frozen=True)
class ZooConfig:
    """A zoo's recipe (its hash names the cache); :mod:`.recipe` says how a network is drawn.

    Attributes:
        num_nets: trained networks; the zoo has ``num_nets * len(checkpoint_fractions)`` members.
        architecture: ``"mlp"`` (two hidden layers) or ``"cnn"`` (three convolutions, global
            average pooling and a linear head, the Small CNN Zoo's shape; :func:`build_network`).
        dataset: ``"digits"`` or ``"mnist1d"``.
        min_width, max_width: hidden widths (channels for ``"cnn"``) are drawn uniformly from this range.
        lr_range: learning rates, log-uniform (whatever the optimiser).
        weight_decay_range: L2 strength (the optimiser's ``weight_decay``), log-uniform.
        init_scale_range: factor on the initialisation, log-uniform.
        train_fraction_range: fraction of the training pool a network trains on, uniform.
        steps_choices: total steps, one drawn per network.
        checkpoint_fractions: the fractions of its steps at which a network is kept (0: at initialisation).
        optimizers: drawn per network from ``"sgd"`` (momentum 0.9), ``"adam"``, ``"rmsprop"``.
        inits: drawn per network from ``"default"``, ``"normal"``, ``"orthogonal"``.
        dropout_range: dropout rate after every hidden activation, uniform (``(0, 0)``: none).
        batch_size: the optimiser's batch size.
        pool_size: datapoints in the training pool.
        test_size: held-out datapoints (MNIST-1D; 0 for digits, whose test set is the other
            ``1797 - pool_size`` images).
        probe_size: the probe batch (the first ``probe_size`` pool datapoints).
        seed: the zoo's seed.
        shard_size: zoo members per cache shard.
    """

    num_nets: int = 100
    architecture: str = "mlp"
    dataset: str = "digits"
    min_width: int = 16
    max_width: int = 64
    lr_range: tuple[float, float] = (3e-3, 0.3)
    weight_decay_range: tuple[float, float] = (1e-6, 3e-2)
    init_scale_range: tuple[float, float] = (0.3, 3.0)
    train_fraction_range: tuple[float, float] = (0.05, 1.0)
    steps_choices: tuple[int, ...] = (100, 200, 400)
    checkpoint_fractions: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0)
    optimizers: tuple[str, ...] = ("sgd",)
    inits: tuple[str, ...] = ("default",)
    dropout_range: tuple[float, float] = (0.0, 0.0)
    batch_size: int = 32
    pool_size: int = 1000
    test_size: int = 0
    probe_size: int = 64
    seed: int = 0
    shard_size: int = 64

    def __post_init__(self) -> None:
        if self.num_nets < 1 or not 1 <= self.min_width <= self.max_width:
            raise GradGraphError(f"ZooConfig: need num_nets >= 1 and 1 <= min_width <= max_width, got "
                                 f"{self.num_nets}, {self.min_width}, {self.max_width}")
        if not self.checkpoint_fractions or not all(0 <= f <= 1 for f in self.checkpoint_fractions):
            raise GradGraphError(f"ZooConfig.checkpoint_fractions must lie in [0, 1], got {self.checkpoint_fractions}")
        if self.architecture not in ("mlp", "cnn"):
            raise GradGraphError(f"ZooConfig.architecture must be mlp or cnn, got {self.architecture!r}")
        if self.dataset not in DATASETS:
            raise GradGraphError(f"ZooConfig.dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name, value, known in (("optimizers", self.optimizers, OPTIMIZERS), ("inits", self.inits, INITS)):
            if not value or not set(value) <= set(known):
                raise GradGraphError(f"ZooConfig.{name} must be a non-empty subset of {known}, got {value}")
        if not 0 <= self.dropout_range[0] <= self.dropout_range[1] < 1:
            raise GradGraphError(f"ZooConfig.dropout_range must satisfy 0 <= low <= high < 1, got {self.dropout_range}")
        if self.dataset == "digits" and not 0 < self.probe_size <= self.pool_size < 1797:
            raise GradGraphError(f"ZooConfig (digits): need 0 < probe_size <= pool_size < 1797, got {self.probe_size}, "
                                 f"{self.pool_size}")
        if self.dataset == "mnist1d" and not (0 < self.probe_size <= self.pool_size and self.test_size > 0
                                              and (self.pool_size + self.test_size) % 10 == 0):
            raise GradGraphError(f"ZooConfig (mnist1d): need 0 < probe_size <= pool_size, test_size > 0 and "
                                 f"pool_size + test_size a multiple of 10, got {self.probe_size}, {self.pool_size}, "
                                 f"{self.test_size}")

    @property
    def num_checkpoints(self) -> int:
        """Members per network."""
        return len(self.checkpoint_fractions)

    @property
    def num_members(self) -> int:
        """Zoo members (networks x checkpoints)."""
        return self.num_nets * self.num_checkpoints

    def hash_fields(self) -> dict:
        """The fields that name the cache: every field, less those at the first zoo's values (:data:`_FIRST_ZOO`)."""
        def first(key: str, value: object) -> bool:
            known = _FIRST_ZOO[key]
            return tuple(value) == known if isinstance(known, tuple) else value == known

        return {key: value for key, value in asdict(self).items() if key not in _FIRST_ZOO or not first(key, value)}


#: The first zoo's name for :class:`ZooConfig`.
DigitsZooConfig = ZooConfig


@dataclass
class Images:
    """A dataset split once: ``pool`` (networks train on part of it), ``test`` (accuracy).

    Shapes: ``pool_x [n, *shape]``, ``pool_y [n]`` (int64), ``test_x [m, *shape]``, ``test_y [m]``.
    """

    pool_x: Tensor
    pool_y: Tensor
    test_x: Tensor
    test_y: Tensor


Digits = Images


def load_digits_split(config: ZooConfig) -> Images:
    """The 1797 digits (pixels / 16, float32; ``[n, 64]``, or images ``[n, 1, 8, 8]`` for a CNN zoo)
    shuffled with ``config.seed``: the first ``pool_size`` are the training pool, the rest the test set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))
    x, y = x[order], y[order]
    if config.architecture == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    return Images(x[:config.pool_size], y[:config.pool_size], x[config.pool_size:], y[config.pool_size:])


def load_images(config: ZooConfig, cache_root: Path | None = None) -> Images:
    """The zoo's dataset: :func:`load_digits_split`, or MNIST-1D (``[n, 40]``, ``[n, 1, 40]`` for a CNN
    zoo; ``pool_size`` training and ``test_size`` test signals, generated locally and cached)."""
    if config.dataset == "digits":
        return load_digits_split(config)
    from gradgraph_lab.tasks.learned_optimizer.mnist1d import mnist1d_split

    x_train, y_train, x_test, y_test = mnist1d_split(config.pool_size, config.test_size,
                                                     None if cache_root is None else str(cache_root))
    if config.architecture == "cnn":
        x_train, x_test = x_train[:, None, :], x_test[:, None, :]
    return Images(x_train, y_train, x_test, y_test)


@dataclass
class ZooData:
    """The zoo's graphs and what the predictors read.

    Attributes:
        config: the recipe.
        graphs: every member's :class:`~gradgraph.GradGraph` (``y [1, 1]``: test accuracy).
        accuracy: ``[num_members]`` float64 test accuracies.
        net_of: ``[num_members]`` the network each member is a checkpoint of.
        recipes: every network's hyperparameters (:func:`sample_recipe`), in order.
    """

    config: ZooConfig
    graphs: list
    accuracy: Tensor
    net_of: Tensor
    recipes: list = field(default_factory=list)


class _Networks:
    """Zoo member ``i`` as a module, training its network once for all of its checkpoints."""

    def __init__(self, config: ZooConfig, data: Images) -> None:
        self.config, self.data = config, data
        self.net, self.checkpoints = -1, []

    def __call__(self, member: int) -> nn.Module:
        net, checkpoint = divmod(member, self.config.num_checkpoints)
        if net != self.net:
            self.net, self.checkpoints = net, train_network(self.config, net, self.data)
        return self.checkpoints[checkpoint]


def load_zoo(config: ZooConfig, *, cache_root: Path | None = None, progress: bool = True,
             context: DistributedContext | None = None) -> ZooData:
    """The zoo's graphs, from the cache or built (every rank builds its share of the shards).

    Args:
        config: the recipe.
        cache_root: where the cache goes (``None``: ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``).
        progress: print a line per shard built.
        context: the processes (ranks split the shards; see :class:`~gradgraph.datasets.ModelZoo`).
    """
    data = load_images(config, cache_root)
    root = Path(cache_root or default_cache_root()) / f"zoo-accuracy-{config_hash(config.hash_fields())}"
    probe_x, probe_y = data.pool_x[:config.probe_size], data.pool_y[:config.probe_size]
    rank = context.rank if context is not None else None
    world = context.world_size if context is not None else None
    name = f"digits-{config.architecture}" if config.dataset == "digits" else f"{config.dataset}-{config.architecture}"
    zoo = ModelZoo(root, range(config.num_members), probe_x, probe_targets=probe_y,
                   loss_fn=lambda output, labels: F.cross_entropy(output, labels, reduction="none"),
                   builder=_Networks(config, data),
                   targets=lambda index, model: torch.tensor([[held_out_accuracy(model, data)]], dtype=torch.float64),
                   shard_size=config.shard_size, name=name, rank=rank, world_size=world, log=progress,
                   barrier=None if context is None else lambda: context.barrier(f"waiting for the shards in {root}"))
    graphs = [zoo[index] for index in range(len(zoo))]
    accuracy = torch.cat([graph.y[:, 0] for graph in graphs])
    net_of = torch.arange(config.num_members) // config.num_checkpoints
    return ZooData(config, graphs, accuracy, net_of, [sample_recipe(config, net) for net in range(config.num_nets)])
