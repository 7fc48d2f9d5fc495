"""INR editing (GradMetaNet §7.3): edit a SIREN's weights so that it draws a dilated digit.

Split by job: :mod:`.data` (batches of stacked INRs), :mod:`.models` (the editing models and
their registry :func:`build_model`), :mod:`.run` (configuration, training runs, results).
"""

from gradgraph_lab.tasks.inr_editing.data import InrBatch, InrSource, mse_per_inr
from gradgraph_lab.tasks.inr_editing.models import MODEL_NAMES, EditModelConfig, EditNet, InrEditor, build_model
from gradgraph_lab.tasks.inr_editing.run import InrEditConfig, preset, results_table, run_inr_editing

__all__ = [
    "MODEL_NAMES",
    "EditModelConfig",
    "EditNet",
    "InrBatch",
    "InrEditConfig",
    "InrEditor",
    "InrSource",
    "build_model",
    "mse_per_inr",
    "preset",
    "results_table",
    "run_inr_editing",
]
