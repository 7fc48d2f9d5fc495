"""The inner tasks of the learned-optimizer experiments, on data that ships with the install.

* ``digits`` — scikit-learn's 8×8 digits (1,797 images, 10 classes), MLP 64→32→10 (ReLU),
  batch 128: the paper's 8×8 F-MNIST analogue; meta-training runs on it.
* ``digits-wide`` — held out from meta-training: the same data, MLP 64→64→64→10.
* ``charlm`` — a character-level language model on the standard library's own source
  files: one-hot input ``Linear(V→32)`` (an embedding), ``nn.TransformerEncoder`` with 2
  blocks, d = 32, 4 heads, causal mask, context 16, batch 8, head ``Linear(32→V)``.

Every task has a fixed train/test split (test = 20% of the digits; the last 10% of the
text), a :class:`~gradgraph.optim.Task` for meta-training whose inner runs train on 80% of
the training split and are scored on the other 20% (validation), and full-test-set evaluation.
``get_task(name, device)`` puts everything on ``device``: the data once, every model the
factory makes, every batch and the test set (random streams stay CPU generators, so the
batches and initialisations are the same on every device).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradgraph.errors import GradGraphError
from gradgraph.optim import Task

__all__ = ["TASK_FAMILIES", "TASK_NAMES", "BenchmarkTask", "char_corpus", "digits_split", "get_family", "get_task",
           "make_mlp"]

#: MNIST-1D tasks (:mod:`~gradgraph_lab.tasks.learned_optimizer.mnist1d`): widths and activation. ``mnist1d``
#: is the main task (the paper's 8×8 F-MNIST MLP analogue); the others are held out from its meta-training.
MNIST1D_TASKS: dict[str, tuple[tuple[int, ...], type[nn.Module]]] = {
    "mnist1d": ((40, 32, 10), nn.ReLU),
    "mnist1d-wide": ((40, 64, 64, 10), nn.ReLU),
    "mnist1d-tanh": ((40, 32, 10), nn.Tanh),
}
#: steps between evaluations on MNIST-1D's 10,000 test (or validation) samples: one evaluation costs
#: about three Adam steps of the MLP, and 5 steps is 1% of the default 500-step budget.
MNIST1D_EVAL_EVERY = 5

TASK_NAMES = (*MNIST1D_TASKS, "digits", "digits-wide", "charlm")

#: Task families for a general-purpose file (``MetaRunConfig(task="mnist1d-family")``): member name ->
#: ``(data, widths, activation, batch size)``, ``data`` ``"mnist1d"`` or ``"digits"``. Widths, depths,
#: activations and batch sizes vary; the held-out tasks stay out (no tanh, nothing as wide as ``mnist1d-wide``'s 64 → 64, no digits), so the
#: held-out rows of the benchmark measure how the family's file carries over.
TASK_FAMILIES: dict[str, dict[str, tuple[str, tuple[int, ...], type[nn.Module], int]]] = {
    "mnist1d-family": {
        "mnist1d": ("mnist1d", (40, 32, 10), nn.ReLU, 128),
        "mnist1d-deep-b64": ("mnist1d", (40, 32, 32, 10), nn.ReLU, 64),
        "mnist1d-sigmoid-48": ("mnist1d", (40, 48, 10), nn.Sigmoid, 128),
        "mnist1d-narrow-b256": ("mnist1d", (40, 16, 10), nn.ReLU, 256),
    },
}


def make_mlp(widths: tuple[int, ...], seed: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear → activation → … → Linear`` with ``widths`` (in, hidden…, out), initialised from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(fan_in, fan_out)
        bound = fan_in ** -0.5
        with torch.no_grad():
            # PyTorch's default (Kaiming-uniform with a=√5) bound, drawn from our own stream.
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        layers.append(linear)
        if index + 2 < len(widths):
            layers.append(activation())
    return nn.Sequential(*layers)


@lru_cache(maxsize=1)
def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [1437, 64], y_train, x_test [360, 64], y_test)``, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    num_test = len(y) // 5
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


_STDLIB_FILES = ("argparse.py", "functools.py", "collections/__init__.py", "dataclasses.py", "inspect.py",
                 "typing.py", "pathlib.py", "random.py", "textwrap.py", "string.py")


@lru_cache(maxsize=1)
def char_corpus() -> tuple[Tensor, Tensor, int]:
    """``(train_ids, test_ids, vocab_size)`` from standard-library source files.

    Characters are mapped to printable ASCII (32..126) plus newline; anything else becomes
    ``?``. The files are those of :data:`_STDLIB_FILES` that exist in this Python's ``Lib``.
    """
    lib = os.path.dirname(os.__file__)
    texts = []
    for name in _STDLIB_FILES:
        path = os.path.join(lib, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as file:
                texts.append(file.read())
    if not texts:
        raise GradGraphError(f"char_corpus: none of {_STDLIB_FILES} found under {lib}")
    text = "\n".join(texts)
    vocab = ["\n"] + [chr(c) for c in range(32, 127)]
    lookup = {ch: i for i, ch in enumerate(vocab)}
    unknown = lookup["?"]
    ids = torch.tensor([lookup.get(ch, unknown) for ch in text], dtype=torch.long)
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:], len(vocab)


class CharTransformer(nn.Module):
    """``Linear(V→d)`` (one-hot input: an embedding) → ``nn.TransformerEncoder`` → ``Linear(d→V)``.

    Shapes: ``[b, T, V]`` one-hot → ``[b, T, V]`` logits. No positional encoding: the causal
    mask alone breaks the permutation symmetry of positions (the task predates the traced
    converter, which would follow ``nn.Embedding`` and a learned position table too; it is kept
    as it is so that its results stay comparable).
    """

    def __init__(self, vocab: int, d_model: int = 32, heads: int = 4, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.head(self.encoder(self.embed(x), mask=mask))


@dataclass
class BenchmarkTask:
    """A task of the benchmark: meta-training interface plus test evaluation.

    Attributes:
        task: the :class:`~gradgraph.optim.Task` (model factory, training stream, loss).
        test_loss: ``model -> float`` mean loss over the whole test set.
        batch_size: training batch size.
        meta_task: the task meta-training uses: inner runs train on 80% of the training set
            and the meta-loss is measured on the other 20% (never the test set); ``None``:
            ``task`` itself.
        device: where the models, batches and test data live.
        eval_every: steps between test-loss evaluations of the benchmark and of the
            validation protocol (charlm: 10 — a full test pass costs several training steps).
        validation: the same benchmark on the validation split — inner runs train on
            ``meta_task``'s stream, ``test_loss`` is the loss on the held-out 20% of the
            training set. Meta-training tunes its start and selects its checkpoint on it,
            so the test set is used only by the final benchmark; ``None``: no split.
    """

    task: Task
    test_loss: Callable[[nn.Module], float]
    batch_size: int
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    meta_task: Task | None = None
    validation: "BenchmarkTask | None" = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eval_every: int = 1


def _classification_task(name: str, split: tuple[Tensor, Tensor, Tensor, Tensor], widths: tuple[int, ...],
                         device: torch.device, batch_size: int = 128, activation: type[nn.Module] = nn.ReLU,
                         eval_every: int = 1) -> BenchmarkTask:
    """An MLP classification task on ``split = (x_train, y_train, x_test, y_test)``; the last 20%
    of the training set is the validation split of meta-training and of the tuning."""
    x_train, y_train, x_test, y_test = (t.to(device) for t in split)

    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(len(y_train), generator=generator)[:batch_size].to(device)
        return x_train[index], y_train[index]

    def loss_fn(output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output, targets, reduction="none")

    @torch.no_grad()
    def test_loss(model: nn.Module) -> float:
        return float(F.cross_entropy(model(x_test), y_test))

    task = Task(name, lambda seed: make_mlp(widths, seed, activation).to(device), sample, loss_fn)
    num_inner = len(y_train) * 4 // 5

    def sample_inner(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = torch.randperm(num_inner, generator=generator)[:batch_size].to(device)
        return x_train[index], y_train[index]

    def sample_validation(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        index = num_inner + torch.randperm(len(y_train) - num_inner, generator=generator)[:batch_size].to(device)
        return x_train[index], y_train[index]

    meta_task = Task(name, task.make_model, sample_inner, loss_fn, sample_validation=sample_validation)
    x_validation, y_validation = x_train[num_inner:], y_train[num_inner:]

    @torch.no_grad()
    def validation_loss(model: nn.Module) -> float:
        return float(F.cross_entropy(model(x_validation), y_validation))

    validation = BenchmarkTask(meta_task, validation_loss, batch_size, device=device, eval_every=eval_every)
    return BenchmarkTask(task, test_loss, batch_size, meta_task=meta_task, validation=validation, device=device,
                         eval_every=eval_every)


def _charlm_task(device: torch.device, batch_size: int = 8, context: int = 16, test_windows: int = 512,
                eval_every: int = 10) -> BenchmarkTask:
    train_ids, test_ids, vocab = char_corpus()
    train_ids, test_ids = train_ids.to(device), test_ids.to(device)
    mask = nn.Transformer.generate_square_subsequent_mask(context, device=device)
    # Meta-training's split of the training text: inner runs train on its first 80% and are
    # scored on windows of the last 20% (contiguous, so no window straddles the two).
    num_inner = len(train_ids) * 4 // 5

    def windows(ids: Tensor, begin: Tensor) -> tuple[Tensor, Tensor]:
        offsets = begin[:, None] + torch.arange(context + 1, device=device)
        chunk = ids[offsets]
        return F.one_hot(chunk[:, :-1], vocab).float(), chunk[:, 1:]

    def sampler(low: int, high: int) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
        def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
            begin = torch.randint(low, high - context - 1, (batch_size,), generator=generator).to(device)
            return windows(train_ids, begin)
        return sample

    def fixed_windows(ids: Tensor, low: int, high: int) -> tuple[Tensor, Tensor]:
        return windows(ids, torch.linspace(low, high - context - 2, test_windows).long().to(device))

    def loss_fn(output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output.transpose(1, 2), targets, reduction="none").mean(dim=1)

    def loss_on(inputs: Tensor, targets: Tensor) -> Callable[[nn.Module], float]:
        @torch.no_grad()
        def evaluate(model: nn.Module) -> float:
            return float(loss_fn(model(inputs, mask=mask), targets).mean())
        return evaluate

    def make(seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return CharTransformer(vocab).to(device)

    forward_kwargs = {"mask": mask}
    task = Task("charlm", make, sampler(0, len(train_ids)), loss_fn, forward_kwargs=forward_kwargs)
    meta_task = Task("charlm", make, sampler(0, num_inner), loss_fn, forward_kwargs=forward_kwargs,
                     sample_validation=sampler(num_inner, len(train_ids)))
    validation_loss = loss_on(*fixed_windows(train_ids, num_inner, len(train_ids)))
    validation = BenchmarkTask(meta_task, validation_loss, batch_size, forward_kwargs=forward_kwargs, device=device,
                               eval_every=eval_every)
    return BenchmarkTask(task, loss_on(*fixed_windows(test_ids, 0, len(test_ids))), batch_size,
                         forward_kwargs=forward_kwargs, meta_task=meta_task, validation=validation, device=device,
                         eval_every=eval_every)


def _classification_data(data: str) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], int]:
    """``(split, eval_every)`` of a classification data set: ``"mnist1d"`` or ``"digits"``."""
    if data == "mnist1d":
        from gradgraph_lab.tasks.learned_optimizer.mnist1d import mnist1d_split

        return mnist1d_split(), MNIST1D_EVAL_EVERY
    if data == "digits":
        return digits_split(), 1
    raise GradGraphError(f"unknown classification data {data!r} (mnist1d or digits)")


def get_task(name: str, device: torch.device | str = "cpu") -> BenchmarkTask:
    """The benchmark task ``name`` (one of :data:`TASK_NAMES`) with its data and models on ``device``."""
    device = torch.device(device)
    if name in MNIST1D_TASKS:
        widths, activation = MNIST1D_TASKS[name]
        split, eval_every = _classification_data("mnist1d")
        return _classification_task(name, split, widths, device, activation=activation, eval_every=eval_every)
    if name in ("digits", "digits-wide"):
        split, eval_every = _classification_data("digits")
        widths = (64, 32, 10) if name == "digits" else (64, 64, 64, 10)
        return _classification_task(name, split, widths, device, eval_every=eval_every)
    if name == "charlm":
        return _charlm_task(device)
    raise GradGraphError(f"unknown learned-optimizer task {name!r}; choose from {TASK_NAMES}")


def get_family(name: str, device: torch.device | str = "cpu") -> list[BenchmarkTask]:
    """The member tasks of the task family ``name`` (a key of :data:`TASK_FAMILIES`), each with its own
    validation split, on ``device``."""
    if name not in TASK_FAMILIES:
        raise GradGraphError(f"unknown learned-optimizer task family {name!r}; choose from {tuple(TASK_FAMILIES)}")
    members = []
    for member, (data, widths, activation, batch_size) in TASK_FAMILIES[name].items():
        split, eval_every = _classification_data(data)
        members.append(_classification_task(member, split, widths, torch.device(device), batch_size=batch_size,
                                            activation=activation, eval_every=eval_every))
    return members
