"""Group actions on networks and on their GradGraphs (tests prove equivariance with them)."""

from gradgraph.symmetry.permutation import (
    edge_permutation,
    move_values,
    hidden_perms_to_node_permutation,
    permute_components,
    permute_hidden,
    permute_nodes,
    random_hidden_perms,
    random_node_permutation,
)
from gradgraph.symmetry.scaling import (
    Canonicalization,
    admissible_transformations,
    canonicalize,
    flip_hidden,
    flip_nodes,
    hidden_factors_to_node_factors,
    random_node_factors,
    rescale_hidden,
    rescale_nodes,
    transform_nodes,
)

__all__ = [
    "Canonicalization",
    "admissible_transformations",
    "canonicalize",
    "flip_hidden",
    "flip_nodes",
    "hidden_factors_to_node_factors",
    "random_node_factors",
    "rescale_hidden",
    "rescale_nodes",
    "transform_nodes",
    "edge_permutation",
    "move_values",
    "hidden_perms_to_node_permutation",
    "permute_components",
    "permute_hidden",
    "permute_nodes",
    "random_hidden_perms",
    "random_node_permutation",
]
