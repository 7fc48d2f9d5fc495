"""``vmapped_update`` embeds many particles a chunk at a time (``batched.EMBED_CHUNK``): the same updates.

At 32 particles one GradMetaNet forward over all their graphs falls out of cache, so the batched
path embeds ``EMBED_CHUNK`` particles at a time (docs/learned_optimizer.md). These tests compare a
chunked call with one forward over every particle in float64, over two steps (the factor EMAs of
the first step feed the second), with chunks that divide the particles and a shorter last chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.optim import batched
from gradgraph.optim.batched import chain_gradients, vmapped_update
from gradgraph.optim.chain_graphs import ChainGraphs
from gradgraph.optim.fused import mlp_chain
from strategies import learned_rule

DOUBLE = torch.float64


def _loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, targets, reduction="none")


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_a_chunked_embedding_gives_the_updates_of_one_forward_over_all_particles(chunk, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    chain = mlp_chain(model)
    num_particles, batch_size = 5, 6
    generator = torch.Generator().manual_seed(1)
    params = {name: p.detach()[None] + 0.3 * torch.randn(num_particles, *p.shape, generator=generator, dtype=DOUBLE)
              for name, p in model.named_parameters()}
    inputs = torch.randn(2, num_particles, batch_size, 5, generator=generator, dtype=DOUBLE)
    targets = torch.randint(0, 3, (2, num_particles, batch_size), generator=generator)
    structure = ChainGraphs.from_model(chain, model, inputs[0, 0], targets[0, 0], _loss, num_particles)
    meta = learned_rule("gradmetanet")
    meta_params = {name: value.detach()[None] + 0.05 * torch.randn(num_particles, *value.shape,
                                                                    generator=generator, dtype=DOUBLE)
                   for name, value in meta.named_parameters()}

    def two_steps(embed_chunk: int):
        monkeypatch.setattr(batched, "EMBED_CHUNK", embed_chunk)
        current, state = dict(params), meta.init_state(params)
        for step in range(2):
            _, grads, graphs = chain_gradients(chain, current, inputs[step], targets[step], _loss, structure)
            current, state = vmapped_update(meta, meta_params, current, grads, state, graphs, structure.template)
        return current, state

    chunked, chunked_state = two_steps(chunk)
    whole, whole_state = two_steps(num_particles)
    for name in params:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked_state.factor_emas, whole_state.factor_emas, rtol=1e-12, atol=1e-14)
    assert not torch.equal(whole["0.weight"], params["0.weight"])  # the rule moved the parameters
