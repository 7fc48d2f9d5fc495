"""The learned rule's flat layout: every parameter tensor laid end to end, features normalised by segment.

``LearnedUpdate.forward`` computes the per-tensor RMS of its features (and of GradMetaNet's
embedding) on the flat ``[P, D, C]`` layout with a one-hot segment matrix; these tests hold it to
the per-tensor form (:func:`gradgraph.optim.parameter_features`) it replaces.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradgraph.optim import LearnedUpdate, MetaModelConfig, parameter_features
from gradgraph.optim.features import flat_parameter_features, segment_rms_normalize

DTYPE = torch.float64
SHAPES = {"a.weight": (5, 3), "a.bias": (5,), "b.weight": (2, 5), "b.bias": (2,)}


def _segments(numels):
    which = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(numels))
    return F.one_hot(which, len(numels)).to(DTYPE)


def test_flat_features_equal_the_per_tensor_features():
    """Each tensor's block of the flat features is ``parameter_features`` of that tensor alone
    (clipped, divided by the RMS over *its own* entries): a segment matrix that mixed two tensors,
    or an RMS over all of ``D``, fails here (the tensors have very different scales)."""
    generator = torch.Generator().manual_seed(0)
    particles = 3
    params = {k: torch.randn(particles, *s, generator=generator, dtype=DTYPE) * (i + 1) * 0.3
              for i, (k, s) in enumerate(SHAPES.items())}
    grads = {k: torch.randn(particles, *s, generator=generator, dtype=DTYPE) * 10 ** -i for i, (k, s) in
             enumerate(SHAPES.items())}
    momenta = {k: torch.randn(particles, *s, 6, generator=generator, dtype=DTYPE) * 0.1 for k, s in SHAPES.items()}
    numels = [torch.Size(s).numel() for s in SHAPES.values()]
    flat = flat_parameter_features(torch.cat([params[k].reshape(particles, -1) for k in SHAPES], 1),
                                   torch.cat([grads[k].reshape(particles, -1) for k in SHAPES], 1),
                                   torch.cat([momenta[k].reshape(particles, -1, 6) for k in SHAPES], 1),
                                   _segments(numels))
    for (name, shape), block in zip(SHAPES.items(), flat.split(numels, dim=1)):
        expected = parameter_features(params[name], grads[name], momenta[name]).reshape(particles, -1, 8)
        torch.testing.assert_close(block, expected, atol=1e-13, rtol=0, msg=name)


def test_segment_rms_normalize_gives_each_segment_unit_rms_per_channel():
    """A segment of one entry (a bias of width one) included: kills ``segment_rms_normalize`` 15 of
    run optim 17 (the counts clamped to at least 2, halving a one-entry tensor's mean square)."""
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(2, 9, 4, generator=generator, dtype=DTYPE) * torch.tensor([0.5, 1.0, 1e3, 5.0], dtype=DTYPE)
    out = segment_rms_normalize(values, _segments([4, 1, 4]))
    for part in out.split([4, 1, 4], dim=1):
        torch.testing.assert_close(part.square().mean(1), torch.ones(2, 4, dtype=DTYPE), atol=1e-8, rtol=0)  # eps 1e-12 of the squares


@pytest.mark.parametrize("variant", ["sgdm", "deepsets", "gradmetanet"])
def test_a_step_is_the_same_whatever_the_order_of_the_tensors(variant):
    """The flat layout follows the order of ``params``; the update of each tensor must not depend
    on it (a split back into tensors at the wrong offsets fails here, in float64 to 1e-12)."""
    torch.manual_seed(2)
    config = MetaModelConfig(use_gradmetanet=variant == "gradmetanet", learned_term=variant != "sgdm",
                             residual_adam=variant != "sgdm")
    rule = LearnedUpdate(config).to(DTYPE)
    with torch.no_grad():
        for parameter in rule.mlp.parameters() if rule.mlp is not None else ():
            parameter.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(3)
    params = {k: torch.randn(2, *s, generator=generator, dtype=DTYPE) for k, s in SHAPES.items()}
    grads = {k: torch.randn(2, *s, generator=generator, dtype=DTYPE) for k, s in SHAPES.items()}
    embeddings = {k: torch.randn(2, *s, config.embedding_dim, generator=generator, dtype=DTYPE)
                  for k, s in SHAPES.items()} if variant == "gradmetanet" else None
    order = list(reversed(SHAPES))

    def step(names):
        state = rule.init_state({k: params[k] for k in names})
        with torch.no_grad():
            return rule({k: params[k] for k in names}, {k: grads[k] for k in names}, state,
                        embeddings=None if embeddings is None else {k: embeddings[k] for k in names})

    (first, first_state), (second, second_state) = step(list(SHAPES)), step(order)
    for name in SHAPES:
        assert first[name].shape == params[name].shape
        torch.testing.assert_close(first[name], second[name], atol=1e-12, rtol=0, msg=name)
        torch.testing.assert_close(first_state.momenta[name], second_state.momenta[name], atol=0, rtol=0)
    assert not torch.equal(first["a.weight"], params["a.weight"])  # the step moved the parameters


def test_the_segment_matrix_is_one_hot_per_tensor_in_the_values_dtype_and_kept_for_the_last_layout():
    """``LearnedUpdate._segments`` against its docstring: the ``[D, S]`` one-hot of the flat layout, in ``like``'s
    dtype, made once and kept for the last layout (the same tensor again), made anew for another layout or dtype.
    Session 25 (the lead): ``_segments`` changed after run optim 17 (ec303bc); its 20 mutants checked with
    ``MUTANT_UNDER_TEST``: 17 killed here (19: ``one_hot`` without its class count, by the empty last tensor), 3, 11, 13
    a device argument (equivalent in value on CPU); docs/mutation.md, optim."""
    rule = LearnedUpdate(MetaModelConfig())
    like = torch.zeros(2, dtype=DTYPE)
    first = rule._segments([2, 3], like)
    assert first.dtype == DTYPE and torch.equal(first, _segments([2, 3]))
    assert rule._segments([2, 3], like) is first
    other = rule._segments([3, 1, 2], like)
    assert torch.equal(other, _segments([3, 1, 2]))
    single = rule._segments([3, 1, 2], like.float())
    assert single.dtype == torch.float32 and torch.equal(single, other.float())
    assert rule._segments([3, 1, 2], like.float()) is single
    # an empty tensor last still has its column (a zero-width layer's bias): S columns, not as many as appear
    assert torch.equal(rule._segments([2, 0], like), _segments([2, 0])) and rule._segments([2, 0], like).shape == (2, 2)
