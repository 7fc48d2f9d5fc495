"""How one zoo network is drawn, built and trained (the Small CNN Zoo's recipe, Unterthiner et al. 2020).

Every network ``j`` of a zoo draws its hyperparameters from ``config.seed`` and ``j`` alone
(:func:`sample_recipe`), so a network trains the same wherever and whenever it is rebuilt:

* hidden widths (two for an MLP, three channel counts for a CNN) in ``[min_width, max_width]``;
* the activation, ReLU or tanh;
* the optimiser, one of ``config.optimizers``: ``"sgd"`` (SGD with momentum 0.9), ``"adam"``,
  ``"rmsprop"`` (torch's defaults otherwise), with a log-uniform learning rate (``lr_range``)
  and L2 strength (``weight_decay_range``, the optimiser's ``weight_decay``);
* the initialisation, one of ``config.inits`` — ``"default"`` (torch's), ``"normal"`` (weights
  :math:`\\mathcal N(0, 1/\\text{fan\\_in})`, biases 0), ``"orthogonal"`` (rows orthonormal over a
  weight's flattened fan-in, biases 0) — times a log-uniform scale (``init_scale_range``);
* dropout after every hidden activation, its rate uniform in ``dropout_range`` (0: no layer);
* the fraction of the training pool it trains on (``train_fraction_range``) and its number of
  steps (``steps_choices``, batch ``batch_size``).

It is kept at ``checkpoint_fractions`` of its steps (``0`` keeps the initialisation), so one
network gives members from untrained to converged. Members are returned in ``eval()`` mode
(dropout off), as they are converted and tested.

The architectures (:func:`build_network`):

* ``"mlp"`` — ``d_in -> w1 -> w2 -> 10``;
* ``"cnn"`` on digits (``[b, 1, 8, 8]``) — 3x3 convolutions with strides 2, 1, 2 (padding 1:
  8x8 -> 4x4 -> 4x4 -> 2x2), global average pooling, a linear head;
* ``"cnn"`` on MNIST-1D (``[b, 1, 40]``) — 1-D convolutions of kernel 5, 3, 3 and stride 2
  each (40 -> 20 -> 10 -> 5), global average pooling, a linear head.

The stride-2 first convolution keeps the graph small: the converter reads the input as the first
convolution's windows, so a CNN's graph has one component per datapoint and position of the
first convolution's output grid (16 for digits, 20 for MNIST-1D) — see docs/convolutions.md.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.errors import GradGraphError

if TYPE_CHECKING:
    from gradgraph_lab.tasks.zoo_accuracy.data import Images, ZooConfig

__all__ = ["ACTIVATIONS", "INITS", "OPTIMIZERS", "build_network", "held_out_accuracy", "sample_recipe",
           "train_network"]

OPTIMIZERS = ("sgd", "adam", "rmsprop")
INITS = ("default", "normal", "orthogonal")
ACTIVATIONS = ("relu", "tanh")


def _log_uniform(generator: torch.Generator, bounds: tuple[float, float]) -> float:
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64)))


def _uniform(generator: torch.Generator, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _choice(generator: torch.Generator, options: tuple[Any, ...]) -> Any:
    return options[int(torch.randint(len(options), (), generator=generator))]


def build_network(widths: tuple[int, ...], activation: str, *, input_shape: tuple[int, ...] = (64,),
                  dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The zoo's architectures (see the module docstring).

    Args:
        widths: two hidden widths (MLP) or three channel counts (CNN).
        activation: ``"relu"`` or ``"tanh"``, after every hidden layer.
        input_shape: one datapoint's shape: ``(d,)`` for an MLP, ``(1, 8, 8)`` (digits CNN) or
            ``(1, L)`` (MNIST-1D CNN).
        dropout: rate of an ``nn.Dropout`` after every hidden activation (0: none).

    Shapes: ``[b, *input_shape] -> [b, 10]``.
    """
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]

    def block(layer: nn.Module) -> list[nn.Module]:
        return [layer, act()] + ([nn.Dropout(dropout)] if dropout > 0 else [])

    if len(widths) == 3:
        c1, c2, c3 = widths
        if len(input_shape) == 3:
            layers = [*block(nn.Conv2d(input_shape[0], c1, 3, stride=2, padding=1)),
                      *block(nn.Conv2d(c1, c2, 3, padding=1)), *block(nn.Conv2d(c2, c3, 3, stride=2, padding=1)),
                      nn.AdaptiveAvgPool2d(1)]
        elif len(input_shape) == 2:
            layers = [*block(nn.Conv1d(input_shape[0], c1, 5, stride=2, padding=2)),
                      *block(nn.Conv1d(c1, c2, 3, stride=2, padding=1)),
                      *block(nn.Conv1d(c2, c3, 3, stride=2, padding=1)), nn.AdaptiveAvgPool1d(1)]
        else:
            raise GradGraphError(f"build_network: a CNN needs an input shape (C, L) or (C, H, W), got {input_shape}")
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c3, 10)).to(dtype)
    if len(widths) != 2 or len(input_shape) != 1:
        raise GradGraphError(f"build_network: an MLP needs two widths and a flat input, got {widths}, {input_shape}")
    return nn.Sequential(*block(nn.Linear(input_shape[0], widths[0])), *block(nn.Linear(widths[0], widths[1])),
                         nn.Linear(widths[1], 10)).to(dtype)


def sample_recipe(config: ZooConfig, net: int) -> dict[str, Any]:
    """Network ``net``'s hyperparameters, drawn from ``config.seed`` and ``net`` alone.

    The draws of the first zoo (widths, activation, lr, weight decay, init scale, train fraction,
    steps, init seed) come first and in their old order, so its networks are unchanged; the
    optimiser, initialisation and dropout are drawn after them.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + net)
    widths = tuple(int(w) for w in torch.randint(config.min_width, config.max_width + 1,
                                                 (3 if config.architecture == "cnn" else 2,), generator=generator))
    recipe = {
        "widths": widths,
        "activation": _choice(generator, ACTIVATIONS),
        "lr": _log_uniform(generator, config.lr_range),
        "weight_decay": _log_uniform(generator, config.weight_decay_range),
        "init_scale": _log_uniform(generator, config.init_scale_range),
        "train_fraction": _uniform(generator, config.train_fraction_range),
        "steps": _choice(generator, config.steps_choices),
        "init_seed": int(torch.randint(2**31 - 1, (), generator=generator)),
    }
    recipe["optimizer"] = _choice(generator, config.optimizers)
    recipe["init"] = _choice(generator, config.inits)
    recipe["dropout"] = _uniform(generator, config.dropout_range) if config.dropout_range[1] > 0 else 0.0
    return recipe


def _initialise(model: nn.Module, kind: str, scale: float, generator: torch.Generator) -> None:
    """Re-initialise ``model``'s weights by ``kind`` (see the module docstring), then scale every parameter."""
    with torch.no_grad():
        for module in model.modules():
            if kind == "default" or not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                continue
            weight = module.weight
            fan_in = weight[0].numel()
            if kind == "normal":
                weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(fan_in))
            else:  # orthogonal rows of the [out, fan_in] matrix (columns when out > fan_in)
                matrix = torch.randn(max(weight.shape[0], fan_in), min(weight.shape[0], fan_in), generator=generator)
                q, r = torch.linalg.qr(matrix)
                q = q * torch.sign(torch.diagonal(r))
                q = q if weight.shape[0] >= fan_in else q.T
                weight.copy_(q.reshape(weight.shape))
            if module.bias is not None:
                module.bias.zero_()
        for parameter in model.parameters():
            parameter.mul_(scale)


def _optimizer(recipe: dict[str, Any], parameters: Any) -> torch.optim.Optimizer:
    name, lr, decay = recipe["optimizer"], recipe["lr"], recipe["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=decay)
    raise GradGraphError(f"zoo recipe: unknown optimizer {name!r}; choose {', '.join(OPTIMIZERS)}")


def train_network(config: ZooConfig, net: int, data: Images) -> list[nn.Sequential]:
    """Train network ``net`` by its recipe on ``data.pool_x``; returns one ``eval()`` copy per
    checkpoint fraction (in order)."""
    recipe = sample_recipe(config, net)
    generator = torch.Generator().manual_seed(recipe["init_seed"])
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(recipe["init_seed"])  # nn.Linear's default initialisation draws from the global stream
    model = build_network(recipe["widths"], recipe["activation"], input_shape=tuple(data.pool_x.shape[1:]),
                          dropout=recipe["dropout"])
    torch.random.set_rng_state(torch_state)
    _initialise(model, recipe["init"], recipe["init_scale"], generator)
    seen = max(config.batch_size, round(recipe["train_fraction"] * len(data.pool_x)))
    subset = torch.randperm(len(data.pool_x), generator=generator)[:seen]
    x, y = data.pool_x[subset], data.pool_y[subset]
    optimizer = _optimizer(recipe, model.parameters())
    keep_at = sorted({round(fraction * recipe["steps"]) if fraction == 0 else max(1, round(fraction * recipe["steps"]))
                      for fraction in config.checkpoint_fractions})
    if len(keep_at) != config.num_checkpoints:
        raise GradGraphError(f"network {net}: checkpoint fractions {config.checkpoint_fractions} of "
                             f"{recipe['steps']} steps round to the same step")
    kept = [copy.deepcopy(model).eval()] if keep_at[0] == 0 else []
    dropout_state = torch.Generator().manual_seed(recipe["init_seed"] + 1)
    for step in range(1, recipe["steps"] + 1):
        batch = torch.randint(len(x), (config.batch_size,), generator=generator)
        if recipe["dropout"] > 0:  # dropout draws from the global stream: give it the network's own
            saved = torch.random.get_rng_state()
            torch.random.set_rng_state(dropout_state.get_state())
        loss = F.cross_entropy(model(x[batch]), y[batch])
        if recipe["dropout"] > 0:
            dropout_state.set_state(torch.random.get_rng_state())
            torch.random.set_rng_state(saved)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in keep_at:
            kept.append(copy.deepcopy(model).eval())
    return kept


def held_out_accuracy(model: nn.Module, data: Images) -> float:
    """The fraction of ``data.test_x`` that ``model`` classifies right."""
    with torch.no_grad():
        return float((model(data.test_x).argmax(1) == data.test_y).double().mean())
