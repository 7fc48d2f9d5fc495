"""The GradMetaNet learned optimizer (paper §7.2) and its meta-training.

- :class:`LearnedOptimizer` — a ``torch.optim.Optimizer``: ``loss = opt.step(closure)``
  with a closure that returns per-datapoint losses ``[b]``.
- :class:`LearnedUpdate` / :class:`MetaModelConfig` — the update rule
  ``θ ← θ − α(β·F + m)`` with GradMetaNet's per-parameter embedding (or without: "DeepSets").
- :class:`MetaTrainer` / :class:`MetaTrainConfig` / :class:`Task` — meta-training by truncated
  backpropagation or antithetic PES (:class:`PES`), all particles in one batched forward;
  :class:`TaskFamilyTrainer` — one rule on several architectures at once (a task family).
- :func:`load_pretrained` / :func:`pretrained_names` — meta-models shipped in the package.
- :func:`time_above_target` / :func:`first_passage` / :func:`mean_log_loss` — meta-losses
  (:mod:`gradgraph.optim.meta_loss`); :data:`PAPER_PROTOCOL` — the paper's meta-training protocol
  (``MetaTrainConfig.paper()``).
"""

from gradgraph.optim.features import NUM_PARAMETER_FEATURES, parameter_features, time_features
from gradgraph.optim.meta_model import LearnedUpdate, MetaModelConfig, OptimizerState, ParameterLayout
from gradgraph.optim.optimizer import LearnedOptimizer, graph_from_closure
from gradgraph.optim.pes import PES
from gradgraph.optim.meta_loss import META_LOSSES, first_passage, mean_log_loss, time_above_target
from gradgraph.optim.meta_train import PAPER_PROTOCOL, MetaTrainConfig, MetaTrainer, Task, relative_clip_scale
from gradgraph.optim.meta_family import TaskFamilyTrainer
from gradgraph.optim.hub import load_pretrained, meta_model_from_checkpoint, pretrained_names

__all__ = [
    "LearnedOptimizer",
    "LearnedUpdate",
    "MetaModelConfig",
    "MetaTrainConfig",
    "MetaTrainer",
    "META_LOSSES",
    "NUM_PARAMETER_FEATURES",
    "OptimizerState",
    "PAPER_PROTOCOL",
    "PES",
    "ParameterLayout",
    "Task",
    "TaskFamilyTrainer",
    "first_passage",
    "graph_from_closure",
    "load_pretrained",
    "mean_log_loss",
    "meta_model_from_checkpoint",
    "parameter_features",
    "pretrained_names",
    "relative_clip_scale",
    "time_above_target",
    "time_features",
]
