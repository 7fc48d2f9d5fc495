"""Model zoos and cached datasets built on the library (zoo generation, exact targets, caches)."""

from gradgraph_lab.data.cache import ShardedCache, config_hash, default_cache_root
from gradgraph_lab.data.curvature import CurvatureData, GraphBatcher, SirenZooConfig, load_curvature_data
from gradgraph_lab.data.siren_zoo import InputFamily, fisher_diagonal, make_siren, sample_inputs, standard_estimate

__all__ = [
    "CurvatureData",
    "GraphBatcher",
    "InputFamily",
    "ShardedCache",
    "SirenZooConfig",
    "config_hash",
    "default_cache_root",
    "fisher_diagonal",
    "load_curvature_data",
    "make_siren",
    "sample_inputs",
    "standard_estimate",
]
