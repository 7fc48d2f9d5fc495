"""Predicting a network's test accuracy from its gradients (issue 30): the digits MLP zoo
(:mod:`.data`), the predictors (:mod:`.models`) and the experiment (:mod:`.run`)."""

from gradgraph_lab.tasks.zoo_accuracy.models import MODEL_LABELS, MODEL_NAMES
from gradgraph_lab.tasks.zoo_accuracy.run import ZooAccuracyConfig, preset, results_table, run_zoo_accuracy

__all__ = ["MODEL_LABELS", "MODEL_NAMES", "ZooAccuracyConfig", "preset", "results_table", "run_zoo_accuracy"]
