"""Named configurations of the zoo-accuracy experiment (docs/zoo.md has their measured wall times)."""

from __future__ import annotations

from dataclasses import replace

from gradgraph.errors import GradGraphError
from gradgraph_lab.tasks.training import TrainConfig
from gradgraph_lab.tasks.zoo_accuracy.data import ZooConfig
from gradgraph_lab.tasks.zoo_accuracy.graph_models import ModelConfig
from gradgraph_lab.tasks.zoo_accuracy.models import MODEL_NAMES
from gradgraph_lab.tasks.zoo_accuracy.run import ZooAccuracyConfig

__all__ = ["ALL_MODELS", "CNN_RECIPE", "DEFAULT_MODELS", "FAST", "PRESETS", "preset"]

#: The presets :func:`preset` knows.
PRESETS = ("default", "full", "paper", "cnn", "mnist1d-cnn", "cnn-paper", "tiny", "tiny-cnn", "tiny-mnist1d-cnn")

#: The Small CNN Zoo's recipe (Unterthiner et al. 2020) at this scale: every optimiser, learning
#: rate and L2 log-uniform, three initialisations times a log-uniform scale, dropout, ReLU/tanh,
#: a train fraction, and checkpoints at 2%, 10%, 40% and 100% of the steps.
CNN_RECIPE = dict(architecture="cnn", lr_range=(3e-4, 3e-2), weight_decay_range=(1e-6, 1e-2),
                  init_scale_range=(0.5, 2.0), train_fraction_range=(0.1, 1.0),
                  checkpoint_fractions=(0.02, 0.1, 0.4, 1.0), optimizers=("sgd", "adam", "rmsprop"),
                  inits=("default", "normal", "orthogonal"), probe_size=32)
#: Every predictor, in the order docs/zoo.md's runs ran them (the ``full``, ``cnn`` and ``mnist1d-cnn`` presets).
ALL_MODELS = ("grad_stats", "weight_stats", "all_stats", "grad_stats_boost", "metanet_weights",
              "gradmetanet_grad_stats", "gradmetanet_grad", "gradmetanet_pp_grad", "gradmetanet_grad_weights")
#: The predictors of ``default`` (the 10-minute run): every statistics baseline, the weights-only graph
#: metanetwork and the best gradient model measured (GradMetaNet on gradients with the gradient
#: statistics in its head) — the comparison of issue 30: gradients vs weights, the equivariant models
#: vs the statistics. GradMetaNet on gradients alone, GradMetaNet++ and GradMetaNet on gradients +
#: weights (each behind it on every zoo measured) are in ``full``.
DEFAULT_MODELS = ("grad_stats", "weight_stats", "all_stats", "grad_stats_boost", "metanet_weights",
                  "gradmetanet_grad_stats")
#: GradMetaNet reads 16 random components per training step (all when evaluated): 1.8x less
#: training time at the same Kendall tau (docs/zoo.md).
FAST = ModelConfig(train_components=16)


def preset(name: str) -> ZooAccuracyConfig:
    """Named configurations.

    * ``default`` — the digits MLP zoo: 100 networks x 4 checkpoints (60 / 15 / 25 networks), probe
      batch 64, graph models 15 epochs on 16 random probe datapoints per step (:data:`FAST`), 5 seeds,
      the predictors of :data:`DEFAULT_MODELS` (under 10 minutes on 2 CPU cores, docs/zoo.md).
    * ``full`` — the digits MLP zoo with every predictor (:data:`ALL_MODELS`), GradMetaNet on all
      64 probe datapoints: the run of docs/zoo.md's MLP table (the ``default`` of before; about
      three times the time).
    * ``cnn`` — the Small CNN Zoo recipe (:data:`CNN_RECIPE`) on digits: 100 CNNs (3x3
      convolutions of 4-16 channels, strides 2, 1, 2, global average pooling, a linear head;
      200, 400 or 800 steps, dropout up to 0.5) x 4 checkpoints, probe batch 32.
    * ``mnist1d-cnn`` — the same recipe on MNIST-1D (4000 training / 1000 test signals): 1-D
      convolutions of 8-24 channels, 300, 600 or 1200 steps, dropout up to 0.3.
    * ``paper`` / ``cnn-paper`` — 1000 networks (700 / 100 / 200), 100 epochs, wider graph models
      (a GPU or several processes).
    * ``tiny`` / ``tiny-cnn`` / ``tiny-mnist1d-cnn`` — seconds-long smoke runs for tests.
    """
    if name == "default":
        return ZooAccuracyConfig(models=DEFAULT_MODELS, model=FAST)
    if name == "full":
        return ZooAccuracyConfig(models=ALL_MODELS)
    big = dict(num_train=700, num_val=100, num_test=200, train=TrainConfig(epochs=100, batch_size=32, lr=1e-3),
               model=ModelConfig(hidden_channels=64, component_channels=16, num_component_layers=2))
    if name == "paper":
        return ZooAccuracyConfig(zoo=ZooConfig(num_nets=1000), models=MODEL_NAMES, **big)
    if name == "cnn":
        return ZooAccuracyConfig(zoo=ZooConfig(min_width=4, max_width=16, steps_choices=(200, 400, 800),
                                               dropout_range=(0.0, 0.5), **CNN_RECIPE), models=ALL_MODELS)
    if name == "mnist1d-cnn":
        return ZooAccuracyConfig(zoo=ZooConfig(dataset="mnist1d", pool_size=4000, test_size=1000, min_width=8,
                                               max_width=24, steps_choices=(300, 600, 1200),
                                               dropout_range=(0.0, 0.3), **CNN_RECIPE), models=ALL_MODELS)
    if name == "cnn-paper":
        cnn = preset("mnist1d-cnn")
        return replace(cnn, zoo=replace(cnn.zoo, num_nets=1000), models=MODEL_NAMES, **big)
    if name == "tiny":
        return ZooAccuracyConfig(
            zoo=ZooConfig(num_nets=6, min_width=4, max_width=6, steps_choices=(10, 20),
                          checkpoint_fractions=(0.5, 1.0), probe_size=8, shard_size=4),
            num_train=3, num_val=1, num_test=2, train=TrainConfig(epochs=1, batch_size=4, lr=1e-3), seeds=(0,),
            model=ModelConfig(hidden_channels=8, component_channels=4, num_node_layers=1, stats_channels=4),
            progress=False, models=MODEL_NAMES)
    if name in ("tiny-cnn", "tiny-mnist1d-cnn"):
        tiny = preset("tiny")
        recipe = {**CNN_RECIPE, "checkpoint_fractions": (0.5, 1.0), "probe_size": 4}
        zoo = replace(tiny.zoo, min_width=2, max_width=3, dropout_range=(0.0, 0.3), **recipe)
        if name == "tiny-mnist1d-cnn":
            zoo = replace(zoo, dataset="mnist1d", pool_size=200, test_size=100)
        return replace(tiny, zoo=zoo)
    raise GradGraphError(f"unknown zoo-accuracy preset {name!r}; choose {', '.join(PRESETS)}")
