"""Datasets of GradGraphs: a model zoo as a PyG dataset, input normalisation, atomic writes.

Sits after :mod:`gradgraph.convert` in the library's order (it converts models) and imports
only ``graph``, ``capture`` and ``convert``.
"""

from gradgraph.datasets.atomic import atomic_torch_save, atomic_write, atomic_write_bytes
from gradgraph.datasets.transforms import NormalizeFactors
from gradgraph.datasets.zoo import ModelZoo, check_graph_target

__all__ = ["ModelZoo", "NormalizeFactors", "atomic_torch_save", "atomic_write", "atomic_write_bytes",
           "check_graph_target"]
