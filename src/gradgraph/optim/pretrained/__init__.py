"""Data folder of the shipped meta-models (``<name>.pt``), read by :mod:`gradgraph.optim.hub`."""
