"""Experiments on top of the library, and the one training loop they share."""

from gradgraph_lab.tasks.training import BatchSource, FitResult, LoaderSource, TrainConfig, evaluate, fit

__all__ = ["BatchSource", "FitResult", "LoaderSource", "TrainConfig", "evaluate", "fit"]
