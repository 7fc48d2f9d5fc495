"""The digits MLP zoo: small MLPs trained on scikit-learn's digits with sampled hyperparameters,
checkpointed at several steps, as a :class:`gradgraph.datasets.ModelZoo` with their test accuracies.

Every network ``j`` draws (from ``seed + j``): two hidden widths in ``[min_width, max_width]``,
ReLU or tanh, an SGD-with-momentum learning rate (log-uniform), a weight decay (log-uniform),
an initialisation scale (log-uniform factor on torch's default), the fraction of the training
pool it sees, and a number of steps; it is checkpointed at fixed fractions of its steps
(``checkpoint_fractions``), so one network gives networks from barely trained to converged and
accuracies spread from chance to the best. Zoo member ``i`` is checkpoint ``i % C`` of network
``i // C``; splits are made of whole networks (a network's checkpoints never straddle them).

The graphs: every member converted on one probe batch (``probe_size`` training-pool digits,
cross-entropy per datapoint), with ``y = [[test accuracy]]`` on the held-out digits. Cached by
:class:`~gradgraph.datasets.ModelZoo` under ``cache_root/zoo-accuracy-<config hash>``; a member
is trained only when its shard is missing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.datasets import ModelZoo
from gradgraph.errors import GradGraphError
from gradgraph_lab.data.cache import config_hash, default_cache_root
from gradgraph_lab.distributed import DistributedContext

__all__ = ["DigitsZooConfig", "Digits", "ZooData", "build_network", "load_digits_split", "load_zoo", "train_network"]


@dataclass(frozen=True)
class DigitsZooConfig:
    """The zoo's recipe (its hash names the cache).

    Attributes:
        num_nets: trained networks; the zoo has ``num_nets * len(checkpoint_fractions)`` members.
        min_width, max_width: hidden widths are drawn uniformly from this range (two hidden layers).
        lr_range: SGD (momentum 0.9) learning rates, log-uniform.
        weight_decay_range: log-uniform.
        init_scale_range: factor on torch's default initialisation, log-uniform.
        train_fraction_range: fraction of the training pool a network trains on, uniform.
        steps_choices: total SGD steps, one drawn per network.
        checkpoint_fractions: the fractions of its steps at which a network is kept.
        batch_size: SGD batch size.
        pool_size: digits in the training pool (the rest, 1797 - pool_size, is the test set).
        probe_size: the probe batch (the first ``probe_size`` pool digits of a fixed shuffle).
        seed: the zoo's seed.
        shard_size: zoo members per cache shard.
    """

    num_nets: int = 100
    min_width: int = 16
    max_width: int = 64
    lr_range: tuple[float, float] = (3e-3, 0.3)
    weight_decay_range: tuple[float, float] = (1e-6, 3e-2)
    init_scale_range: tuple[float, float] = (0.3, 3.0)
    train_fraction_range: tuple[float, float] = (0.05, 1.0)
    steps_choices: tuple[int, ...] = (100, 200, 400)
    checkpoint_fractions: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0)
    batch_size: int = 32
    pool_size: int = 1000
    probe_size: int = 64
    seed: int = 0
    shard_size: int = 64

    def __post_init__(self) -> None:
        if self.num_nets < 1 or not 1 <= self.min_width <= self.max_width:
            raise GradGraphError(f"DigitsZooConfig: need num_nets >= 1 and 1 <= min_width <= max_width, got "
                                 f"{self.num_nets}, {self.min_width}, {self.max_width}")
        if not self.checkpoint_fractions or not all(0 < f <= 1 for f in self.checkpoint_fractions):
            raise GradGraphError(f"DigitsZooConfig.checkpoint_fractions must lie in (0, 1], got "
                                 f"{self.checkpoint_fractions}")
        if not 0 < self.probe_size <= self.pool_size < 1797:
            raise GradGraphError(f"DigitsZooConfig: need 0 < probe_size <= pool_size < 1797, got {self.probe_size}, "
                                 f"{self.pool_size}")

    @property
    def num_checkpoints(self) -> int:
        """Members per network."""
        return len(self.checkpoint_fractions)

    @property
    def num_members(self) -> int:
        """Zoo members (networks x checkpoints)."""
        return self.num_nets * self.num_checkpoints


@dataclass
class Digits:
    """scikit-learn's digits split once: ``pool`` (networks train on part of it), ``test`` (accuracy)."""

    pool_x: Tensor
    pool_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_digits_split(config: DigitsZooConfig) -> Digits:
    """The 1797 digits (pixels / 16, ``[n, 64]`` float32) shuffled with ``config.seed``: the first
    ``pool_size`` are the training pool, the rest the test set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))
    x, y = x[order], y[order]
    return Digits(x[:config.pool_size], y[:config.pool_size], x[config.pool_size:], y[config.pool_size:])


def _log_uniform(generator: torch.Generator, bounds: tuple[float, float]) -> float:
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64)))


def build_network(widths: tuple[int, int], activation: str, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``64 -> widths[0] -> widths[1] -> 10`` with ``activation`` (``"relu"`` or ``"tanh"``) after each hidden layer."""
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    return nn.Sequential(nn.Linear(64, widths[0]), act(), nn.Linear(widths[0], widths[1]), act(),
                         nn.Linear(widths[1], 10)).to(dtype)


def sample_recipe(config: DigitsZooConfig, net: int) -> dict[str, Any]:
    """Network ``net``'s hyperparameters, drawn from ``config.seed`` and ``net`` alone."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + net)
    widths = tuple(int(w) for w in torch.randint(config.min_width, config.max_width + 1, (2,), generator=generator))
    return {
        "widths": widths,
        "activation": ("relu", "tanh")[int(torch.randint(2, (), generator=generator))],
        "lr": _log_uniform(generator, config.lr_range),
        "weight_decay": _log_uniform(generator, config.weight_decay_range),
        "init_scale": _log_uniform(generator, config.init_scale_range),
        "train_fraction": config.train_fraction_range[0] + (config.train_fraction_range[1]
                                                            - config.train_fraction_range[0])
        * float(torch.rand((), generator=generator, dtype=torch.float64)),
        "steps": config.steps_choices[int(torch.randint(len(config.steps_choices), (), generator=generator))],
        "init_seed": int(torch.randint(2**31 - 1, (), generator=generator)),
    }


def train_network(config: DigitsZooConfig, net: int, digits: Digits) -> list[nn.Sequential]:
    """Train network ``net`` by its recipe; returns one copy per checkpoint fraction (in order)."""
    import copy

    recipe = sample_recipe(config, net)
    generator = torch.Generator().manual_seed(recipe["init_seed"])
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(recipe["init_seed"])  # nn.Linear's default initialisation draws from the global stream
    model = build_network(recipe["widths"], recipe["activation"])
    torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(recipe["init_scale"])
    seen = max(config.batch_size, round(recipe["train_fraction"] * len(digits.pool_x)))
    subset = torch.randperm(len(digits.pool_x), generator=generator)[:seen]
    x, y = digits.pool_x[subset], digits.pool_y[subset]
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9,
                                weight_decay=recipe["weight_decay"])
    keep_at = sorted({max(1, round(fraction * recipe["steps"])) for fraction in config.checkpoint_fractions})
    if len(keep_at) != config.num_checkpoints:
        raise GradGraphError(f"network {net}: checkpoint fractions {config.checkpoint_fractions} of "
                             f"{recipe['steps']} steps round to the same step")
    kept = []
    for step in range(1, recipe["steps"] + 1):
        batch = torch.randint(len(x), (config.batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in keep_at:
            kept.append(copy.deepcopy(model).eval())
    return kept


def held_out_accuracy(model: nn.Module, digits: Digits) -> float:
    """The fraction of the held-out digits ``model`` classifies right."""
    with torch.no_grad():
        return float((model(digits.test_x).argmax(1) == digits.test_y).double().mean())


@dataclass
class ZooData:
    """The zoo's graphs and what the predictors read.

    Attributes:
        config: the recipe.
        graphs: every member's :class:`~gradgraph.GradGraph` (``y [1, 1]``: test accuracy).
        accuracy: ``[num_members]`` float64 test accuracies.
        net_of: ``[num_members]`` the network each member is a checkpoint of.
    """

    config: DigitsZooConfig
    graphs: list
    accuracy: Tensor
    net_of: Tensor


class _Networks:
    """Zoo member ``i`` as a module, training its network once for all of its checkpoints."""

    def __init__(self, config: DigitsZooConfig, digits: Digits) -> None:
        self.config, self.digits = config, digits
        self.net, self.checkpoints = -1, []

    def __call__(self, member: int) -> nn.Module:
        net, checkpoint = divmod(member, self.config.num_checkpoints)
        if net != self.net:
            self.net, self.checkpoints = net, train_network(self.config, net, self.digits)
        return self.checkpoints[checkpoint]


def load_zoo(config: DigitsZooConfig, *, cache_root: Path | None = None, progress: bool = True,
             context: DistributedContext | None = None) -> ZooData:
    """The zoo's graphs, from the cache or built (every rank builds its share of the shards).

    Args:
        config: the recipe.
        cache_root: where the cache goes (``None``: ``$GRADGRAPH_CACHE`` or ``.gradgraph-cache``).
        progress: print a line per shard built.
        context: the processes (ranks split the shards; see :class:`~gradgraph.datasets.ModelZoo`).
    """
    digits = load_digits_split(config)
    root = Path(cache_root or default_cache_root()) / f"zoo-accuracy-{config_hash(asdict(config))}"
    probe_x, probe_y = digits.pool_x[:config.probe_size], digits.pool_y[:config.probe_size]
    rank = context.rank if context is not None else None
    world = context.world_size if context is not None else None
    zoo = ModelZoo(root, range(config.num_members), probe_x, probe_targets=probe_y,
                   loss_fn=lambda output, labels: F.cross_entropy(output, labels, reduction="none"),
                   builder=_Networks(config, digits),
                   targets=lambda index, model: torch.tensor([[held_out_accuracy(model, digits)]], dtype=torch.float64),
                   shard_size=config.shard_size, name="digits-mlp", rank=rank, world_size=world, log=progress)
    graphs = [zoo[index] for index in range(len(zoo))]
    accuracy = torch.cat([graph.y[:, 0] for graph in graphs])
    net_of = torch.arange(config.num_members) // config.num_checkpoints
    return ZooData(config, graphs, accuracy, net_of)
