"""gradgraph_lab: the experiments built on :mod:`gradgraph` (its lab, not its library).

Model zoos and their caches (:mod:`gradgraph_lab.data`), the experiments — curvature
estimation, INR editing, the learned-optimizer benchmark — and their shared training loop,
seeds loop and results (:mod:`gradgraph_lab.tasks`), device and ``torchrun`` setup
(:mod:`gradgraph_lab.distributed`) and the ``gradgraph`` command (:mod:`gradgraph_lab.cli`).

It ships in the same distribution as :mod:`gradgraph` and needs the ``lab`` extra
(``pip install "gradgraph[lab]"``: matplotlib, scikit-learn, tqdm). The library never imports
it: ``import gradgraph`` stays free of every experiment dependency.
"""
