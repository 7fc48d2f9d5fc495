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

__all__ = [
    "edge_permutation",
    "move_values",
    "hidden_perms_to_node_permutation",
    "permute_components",
    "permute_hidden",
    "permute_nodes",
    "random_hidden_perms",
    "random_node_permutation",
]
