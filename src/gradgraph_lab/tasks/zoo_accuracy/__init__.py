"""Predicting a network's test accuracy from its gradients (issue 30): the zoos (:mod:`.data`,
:mod:`.recipe`), the predictors (:mod:`.models`, :mod:`.graph_models`), the experiment
(:mod:`.run`) and its presets (:mod:`.presets`)."""

from gradgraph_lab.tasks.zoo_accuracy.models import MODEL_LABELS, MODEL_NAMES
from gradgraph_lab.tasks.zoo_accuracy.presets import PRESETS, preset
from gradgraph_lab.tasks.zoo_accuracy.run import ZooAccuracyConfig, results_table, run_zoo_accuracy

__all__ = ["MODEL_LABELS", "MODEL_NAMES", "PRESETS", "ZooAccuracyConfig", "preset", "results_table",
           "run_zoo_accuracy"]
