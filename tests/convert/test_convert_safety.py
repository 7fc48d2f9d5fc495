"""Never silently wrong: what the converter must refuse rather than answer wrongly, and the
neighbouring cases it must still answer exactly.

The per-sample gradients come from one backward pass of ``sum_i L_i``; they are each datapoint's
own only if no loss depends on another datapoint. Each refusal test below was checked against
the converter without its check (``gradgraph.convert.separation.check_separate`` removed from
``_fill``): every coupled case then converted, with per-sample gradients off by 0.15 to 2.1
(float64, against a per-datapoint autograd loop) — the bug these tests guard against.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_values import HalfErfinv
from torch import nn
from traced_models import GPT, reference_per_sample_grads, token_loss

import gradgraph
from gradgraph.errors import DatapointCouplingError, GradGraphError
from gradgraph.optim.optimizer import graph_from_closure

DTYPE = torch.float64


class TwoLayer(nn.Module):
    """``head(tanh(inp(x)))``, then ``tail`` (an op after the last parameter, or none)."""

    def __init__(self, tail=None, d_in: int = 3, hidden: int = 6, d_out: int = 4) -> None:
        super().__init__()
        self.inp, self.head, self.tail = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out), tail

    def forward(self, x):
        output = self.head(torch.tanh(self.inp(x)))
        return output if self.tail is None else self.tail(output)


def loop_per_sample_grads(model, inputs, targets, loss_fn):
    """``dL_i/dθ`` for each ``i`` by one autograd call per datapoint on the whole batch: the truth
    also where the losses couple datapoints (torch.func's vmap would see one datapoint at a time)."""
    names, params = zip(*model.named_parameters())
    losses = loss_fn(model(inputs), targets)
    rows = [torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True) for i in range(len(losses))]
    return {name: torch.stack([torch.zeros_like(param) if row[k] is None else row[k] for row in rows])
            for k, (name, param) in enumerate(zip(names, params))}


def cross_entropy(output, targets):
    return F.cross_entropy(output, targets, reduction="none")


def centred(output, targets):
    losses = cross_entropy(output, targets)
    return losses - losses.mean()


def info_nce(output, targets):
    """InfoNCE over the batch: datapoint ``i``'s positive is row ``i``, its negatives the other rows."""
    anchors = F.normalize(output, dim=-1)
    similarity = anchors @ anchors.roll(1, 0).T / 0.5
    return F.cross_entropy(similarity, torch.arange(len(output)), reduction="none")


def batch_hard(output, targets):
    """Each datapoint's loss against the batch's hardest (largest) loss."""
    losses = cross_entropy(output, targets)
    return losses + 0.1 * losses.max()


def own_views_contrastive(output, targets):
    """A contrastive loss within each datapoint (its features' two halves as views): no coupling."""
    left, right = output.chunk(2, dim=-1)
    left, right = F.normalize(left, dim=-1), F.normalize(right, dim=-1)
    return -(left * right).sum(-1) + torch.logsumexp(output, dim=-1)


def batch(b: int = 6, seed: int = 0, dtype=DTYPE):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, generator=generator, dtype=dtype), torch.randint(0, 4, (b,), generator=generator)


@pytest.mark.parametrize("loss_fn", [centred, info_nce, batch_hard], ids=["minus-mean", "info-nce", "batch-hard"])
def test_a_loss_that_couples_datapoints_is_refused(loss_fn):
    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    # the coupling is real: the true per-sample gradients differ from those of the uncoupled loss
    truth = loop_per_sample_grads(model, inputs, targets, loss_fn)
    plain = loop_per_sample_grads(model, inputs, targets, cross_entropy)
    assert max(float((truth[k] - plain[k]).abs().max()) for k in truth) > 1e-3
    with pytest.raises(DatapointCouplingError, match="mix datapoints"):
        gradgraph.to_graph(model, inputs, targets, loss_fn)
    with pytest.raises(DatapointCouplingError, match="loss - loss.mean"):
        gradgraph.convert_closure(model, lambda: loss_fn(model(inputs), targets))
    with pytest.raises(GradGraphError, match="mix datapoints"):  # the learned optimizer's step converts with this
        graph_from_closure(model, lambda: loss_fn(model(inputs), targets))


def gradients_alone_differ_from_the_batchs(model, inputs, targets, loss_fn):
    """Each datapoint's own gradient (its loss computed on it alone) ``[b][param]``, after checking that it differs
    from that datapoint's gradient in the batch: the coupling a test refuses is real."""
    params = list(model.parameters())
    alone = [torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), params)
             for i in range(len(inputs))]
    batched = loop_per_sample_grads(model, inputs, targets, loss_fn)
    assert max(float((batched[n][i] - alone[i][k]).abs().max()) for i in range(len(inputs))
               for k, (n, _) in enumerate(model.named_parameters())) > 1e-3
    return alone


def scaled_by_the_batchs_largest(output, targets):
    """Each loss over the batch's largest, read into Python: a constant to autograd, one number for the batch."""
    losses = cross_entropy(output, targets)
    return losses / losses.max().item()


def weighted_by_a_branch(output, targets):
    """A branch on the batch's mean loss (1.67 on the tests' batch, whose datapoints alone have 1.30 - 1.99)."""
    losses = cross_entropy(output, targets)
    return losses * 2.0 if bool(losses.mean() > 1.7) else losses


def scaled_by_the_first_output(output, targets):
    """Every loss scaled by datapoint 0's first logit, read with ``float``."""
    return cross_entropy(output, targets) * float(output[0, 0])


PYTHON_READS = {"largest-loss": scaled_by_the_batchs_largest, "branch": weighted_by_a_branch,
                "first-output": scaled_by_the_first_output}


@pytest.mark.parametrize("name", list(PYTHON_READS))
def test_a_loss_that_reads_the_batch_into_python_is_refused(name):
    """A number or branch read from the losses or outputs of the batch couples the datapoints where autograd sees a
    constant, so the separation probe (derivatives) cannot see it: on the code before each of these converted, and
    every per-sample gradient differed from the datapoint's own (its loss computed on it alone). Refused by
    ``to_graph``, ``convert_closure`` and the learned optimizer's step, naming the read."""
    torch.manual_seed(0)
    model, loss_fn = TwoLayer().to(DTYPE), PYTHON_READS[name]
    inputs, targets = batch()
    gradients_alone_differ_from_the_batchs(model, inputs, targets, loss_fn)
    with pytest.raises(DatapointCouplingError, match=r"loss_fn hands values computed from the model's output to "
                       r"Python \((item|__bool__|__float__): a number or a branch\), one for all 6 datapoints"):
        gradgraph.to_graph(model, inputs, targets, loss_fn)
    with pytest.raises(DatapointCouplingError, match="the closure hands values computed from the model's output"):
        gradgraph.convert_closure(model, lambda: loss_fn(model(inputs), targets))
    with pytest.raises(GradGraphError, match="the closure hands values computed from the model's output"):
        graph_from_closure(model, lambda: loss_fn(model(inputs), targets))


def over_the_detached_largest(output, targets):
    """Each loss over the batch's largest, detached: a tensor, but a constant to autograd."""
    losses = cross_entropy(output, targets)
    return losses / losses.detach().max()


def over_the_largest_without_gradient(output, targets):
    """The same statistic computed under ``torch.no_grad()``."""
    losses = cross_entropy(output, targets)
    with torch.no_grad():
        largest = losses.max()
    return losses / largest


# each loss, and the words naming how it cut the gradient
GRADIENT_CUTS = {"detach": (over_the_detached_largest, r"\(detach\)"),
                 "no-grad": (over_the_largest_without_gradient, r"\(torch.no_grad\(\), read by \w+\)")}


@pytest.mark.parametrize(("loss_fn", "how"), list(GRADIENT_CUTS.values()), ids=list(GRADIENT_CUTS))
def test_a_loss_that_cuts_the_gradient_of_the_batchs_values_is_refused(loss_fn, how):
    """A statistic of the batch made without gradient (``detach``, ``no_grad``) couples the datapoints where the
    separation probe (derivatives) sees a constant: on the code before both converted, every per-sample gradient
    differing from the datapoint's own (``no_grad`` was a strict xfail until session 25). gradgraph cannot tell such a
    statistic from a per-datapoint one, so any cut of the output's gradient in a loss is refused (with one datapoint it
    converts)."""
    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    alone = gradients_alone_differ_from_the_batchs(model, inputs, targets, loss_fn)
    with pytest.raises(DatapointCouplingError, match=r"loss_fn cuts the gradient of values computed from the "
                       r"model's output " + how):
        gradgraph.to_graph(model, inputs, targets, loss_fn)
    with pytest.raises(DatapointCouplingError, match="the closure cuts the gradient"):
        gradgraph.convert_closure(model, lambda: loss_fn(model(inputs), targets))
    graph = gradgraph.to_graph(model, inputs[:1], targets[:1], loss_fn)
    for k, (n, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(graph.per_sample_grads()[n][0], alone[0][k], atol=1e-12, rtol=0, msg=n)


@pytest.mark.parametrize("name", list(PYTHON_READS))
def test_a_loss_that_reads_one_datapoint_into_python_converts_exactly(name):
    """The control: with one datapoint the read couples nothing; ``to_graph`` and ``convert_closure`` give its own
    gradient (torch.func does not run reads into Python: autograd on the one datapoint)."""
    torch.manual_seed(0)
    model, loss_fn = TwoLayer().to(DTYPE), PYTHON_READS[name]
    inputs, targets = batch(1)
    names, params = zip(*model.named_parameters())
    expected = torch.autograd.grad(loss_fn(model(inputs), targets).sum(), params)
    for graph in (gradgraph.to_graph(model, inputs, targets, loss_fn),
                  gradgraph.convert_closure(model, lambda: loss_fn(model(inputs), targets))[0]):
        for name_, value in zip(names, expected):
            torch.testing.assert_close(graph.per_sample_grads()[name_][0], value, atol=1e-12, rtol=0, msg=name_)


def test_a_loss_that_reads_its_targets_into_python_converts_exactly():
    """Reading the targets (not computed from the output) into Python couples nothing: a check on them and a class
    count read with ``int`` leave the conversion exact at any batch size."""
    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()

    def checked(output, t):
        assert bool((t >= 0).all()) and int(t.max()) < output.shape[-1]
        return cross_entropy(output, t)

    graph = gradgraph.to_graph(model, inputs, targets, checked)
    reference = reference_per_sample_grads(model, inputs, targets, cross_entropy)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-12, rtol=0, msg=name)


def test_a_coupled_loss_is_refused_also_when_the_plan_is_cached():
    """The loss is not part of the plan's key: a replay of a cached plan checks it too."""
    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    gradgraph.to_graph(model, inputs, targets, cross_entropy)  # traces and caches the plan
    with pytest.raises(DatapointCouplingError):
        gradgraph.to_graph(model, inputs, targets, centred)


TAILS = {
    "minus-batch-mean": lambda o: o - o.mean(0),
    "softmax-over-batch": lambda o: o.softmax(0),
    "roll": lambda o: o.roll(1, 0),
    "flip": lambda o: o.flip(0),
    "cumsum": lambda o: o.cumsum(0),
    "sort": lambda o: o.sort(0).values,
    "permuted-rows": lambda o: o[[1, 0, 2, 3, 4, 5]],
}


def over_the_largest_under_no_grad(output):
    with torch.no_grad():
        largest = output.abs().max()
    return output / largest


def over_the_batch_mean_under_no_grad(output):
    with torch.no_grad():
        mean = output.mean(0)
    return output - mean


# each tail, and the op named as the one that cut the gradient
CUT_TAILS = {
    "detached-largest": (lambda o: o / o.detach().abs().max(), "Tensor.detach"),
    "no-grad-largest": (over_the_largest_under_no_grad, r"Tensor.max under torch.no_grad\(\)"),
    "detached-batch-mean": (lambda o: o - o.detach().mean(0), "Tensor.detach"),
    "no-grad-batch-mean": (over_the_batch_mean_under_no_grad, r"Tensor.mean under torch.no_grad\(\)"),
}


@pytest.mark.parametrize(("tail", "how"), list(CUT_TAILS.values()), ids=list(CUT_TAILS))
def test_a_forward_whose_output_is_made_from_a_cut_gradient_is_refused(tail, how):
    """After the last parameter a statistic of the batch made without gradient (``detach``, ``no_grad``) couples the
    datapoints where autograd, and so the separation probe, sees a constant: on the code before each of these
    converted, every per-sample gradient differing from the datapoint's own (by up to ~2 in absolute value). Refused
    naming the op that cut the gradient; with one datapoint the same model converts exactly."""
    torch.manual_seed(0)
    model = TwoLayer(tail).to(DTYPE)
    inputs, targets = batch()
    alone = gradients_alone_differ_from_the_batchs(model, inputs, targets, cross_entropy)
    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"the model's output: is made from values of the "
                       r"datapoints whose gradient was cut \(" + how + r" at test_convert_safety.py:\d+ in "):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)
    graph = gradgraph.to_graph(model, inputs[:1], targets[:1], cross_entropy)
    for k, (n, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(graph.per_sample_grads()[n][0], alone[0][k], atol=1e-12, rtol=0, msg=n)


def test_a_per_datapoint_statistic_without_gradient_reaching_a_parameter_is_refused_as_before():
    """Before a parameter a cut value is refused where it reaches the parameter (it was before as well, as an op
    without a rule), naming the op that cut the gradient."""
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.head = nn.Linear(3, 6), nn.Linear(6, 4)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.head(h / h.detach().norm(dim=-1, keepdim=True))

    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError,
                       match=r"Tensor.detach: .*reaches torch.nn.functional.linear with the parameter 'head.weight'"):
        gradgraph.to_graph(Normalised().to(DTYPE), inputs, targets, cross_entropy)


def assert_each_datapoints_own_gradient(model, inputs, targets, loss_fn):
    """``to_graph``'s per-sample gradients are those of each datapoint's loss computed on it alone (1e-12)."""
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    params = list(model.parameters())
    for i in range(len(inputs)):
        alone = torch.autograd.grad(loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).sum(), params)
        for k, (n, _) in enumerate(model.named_parameters()):
            torch.testing.assert_close(graph.per_sample_grads()[n][i], alone[k], atol=1e-12, rtol=0, msg=n)


def test_a_custom_autograd_function_runs_without_gradient_and_is_not_refused_as_a_cut():
    """A custom ``autograd.Function``'s forward runs under no gradient like a user's ``torch.no_grad()`` block, but
    what it returns is differentiated after all: after the last parameter and in the loss it converts exactly, b = 6.
    Checked to fail (refused as a cut of the gradient) with ``Tracer.lift_reattached`` returning its input unchanged
    and with ``DerivedValueReads.refuse_without_gradient``'s ``grad_fn`` check removed."""
    torch.manual_seed(0)
    inputs, targets = batch()
    model = TwoLayer(lambda o: HalfErfinv.apply(torch.tanh(o))).to(DTYPE)
    assert_each_datapoints_own_gradient(model, inputs, targets, cross_entropy)
    model = TwoLayer().to(DTYPE)
    assert_each_datapoints_own_gradient(model, inputs, targets,
                                        lambda o, t: cross_entropy(o, t) + HalfErfinv.apply(torch.tanh(o)).sum(-1))


def test_a_per_datapoint_value_under_no_grad_with_a_rule_converts_exactly():
    """``torch.no_grad()`` over an op the trace has a rule for keeps the datapoint's own value (each row's largest
    entry): the per-sample gradients are those of each datapoint alone, b = 6; the same op of the batch's values as a
    whole (``o.abs().max()``) is refused above."""
    def over_each_rows_largest(output):
        with torch.no_grad():
            largest = output.abs().amax(-1, keepdim=True)
        return output / largest

    torch.manual_seed(0)
    inputs, targets = batch()
    assert_each_datapoints_own_gradient(TwoLayer(over_each_rows_largest).to(DTYPE), inputs, targets, cross_entropy)


def test_a_loss_with_weights_made_under_no_grad_is_refused_naming_the_op_that_reads_them():
    """In a loss gradgraph cannot tell a statistic of the batch made under ``no_grad`` from one of a datapoint alone
    (a focal loss's weights), so any value computed from the output under ``no_grad`` is refused where it enters the
    loss's gradient, as a ``detach`` is (the message matched in full); values made under ``no_grad`` and not used in
    the loss (a logged accuracy, compared after the block) are not. Run capture 8 (session 25): kills
    ``DerivedValueReads.__torch_function__`` 51 (``or`` for ``and``: the logged comparison refused) and
    ``refuse_without_gradient`` 16-26 (the message's words)."""
    def focal(output, targets):
        losses = cross_entropy(output, targets)
        with torch.no_grad():
            weights = (1 - torch.exp(-losses)) ** 2
        return weights * losses

    def logged(output, targets):
        with torch.no_grad():
            logged.accuracy = (output.argmax(-1) == targets).double().mean()
        logged.above_half = logged.accuracy > 0.5  # an op with gradient on, but no value with gradient made
        return cross_entropy(output, targets)

    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(DatapointCouplingError) as refusal:
        gradgraph.to_graph(model, inputs, targets, focal)
    assert str(refusal.value) == (
        "loss_fn cuts the gradient of values computed from the model's output (torch.no_grad(), read by mul): a "
        "statistic of the batch made from them (losses / largest, largest computed under no_grad) couples the "
        "datapoints where autograd sees a constant, so every per-sample gradient would be silently wrong, and gradgraph "
        "cannot tell such a statistic from one of a datapoint alone. Compute each datapoint's loss from its own output "
        "with gradient, or convert one datapoint at a time")
    assert_each_datapoints_own_gradient(model, inputs, targets, logged)


@pytest.mark.parametrize("name", list(TAILS))
def test_a_forward_that_mixes_the_batch_after_its_last_parameter_is_refused(name):
    """Inside forward, mixing before a parameterised op is refused by the trace (a reduction over
    datapoints); after the last one it used to pass silently (errors 0.15 - 2.1)."""
    torch.manual_seed(0)
    model = TwoLayer(TAILS[name]).to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(DatapointCouplingError):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)


def test_mixing_before_a_parameter_is_refused_by_the_trace_as_before():
    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.head = nn.Linear(3, 6), nn.Linear(6, 4)

        def forward(self, x):
            hidden = torch.tanh(self.inp(x))
            return self.head(hidden - hidden.mean(0))

    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError, match="a reduction over datapoints"):
        gradgraph.to_graph(Centred().to(DTYPE), inputs, targets, cross_entropy)


def test_a_regulariser_added_to_each_loss_is_refused():
    """``loss_i + λ|W|²`` reaches ``W`` outside the traced forward: its gradient is not in the
    graph's factors (without the check: mean_grad() misses 2λW)."""
    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(GradGraphError, match="'head.weight'"):
        gradgraph.convert_closure(
            model, lambda: cross_entropy(model(inputs), targets) + 1e-2 * model.head.weight.pow(2).sum())


@pytest.mark.parametrize("loss_fn", [cross_entropy, own_views_contrastive], ids=["cross-entropy", "own-views"])
def test_losses_of_each_datapoint_alone_convert_exactly(loss_fn):
    torch.manual_seed(0)
    model = TwoLayer(torch.tanh).to(DTYPE)  # an elementwise tail after the last parameter is fine
    inputs, targets = batch()
    graph = gradgraph.to_graph(model, inputs, targets, loss_fn)
    reference = reference_per_sample_grads(model, inputs, targets, loss_fn)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.parametrize("seed", range(4))
def test_the_check_does_not_refuse_rounding_in_float32(seed):
    """The probe's two backward passes differ by rounding only; in float32 on a batch of 64 with
    large logits no uncoupled loss is refused (a tolerance too tight would refuse these)."""
    torch.manual_seed(seed)
    model = TwoLayer(d_out=10)
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    inputs, targets = batch(64, seed, torch.float32)
    targets = targets.float()
    for loss_fn in (cross_entropy, lambda o, t: (o - t[:, None]).pow(2).sum(-1), own_views_contrastive,
                    lambda o, t: F.cross_entropy(o, t.long(), reduction="none", label_smoothing=0.1)):
        labels = targets.long() if loss_fn is cross_entropy else targets
        graph = gradgraph.to_graph(model, inputs, labels, loss_fn)
        assert int(graph.num_datapoints) == 64
        torch.testing.assert_close(graph.loss, loss_fn(model(inputs), labels).detach())


def test_a_token_model_with_a_per_datapoint_loss_passes_and_a_batch_loss_is_refused():
    """Components per token: the check files each token's signal under its datapoint."""
    torch.manual_seed(0)
    model = GPT(layers=1).to(DTYPE).eval()
    tokens = torch.randint(0, 11, (4, 8))
    targets = torch.randint(0, 11, (4, 8))
    graph = gradgraph.to_graph(model, tokens, targets, token_loss)
    reference = reference_per_sample_grads(model, tokens, targets, token_loss)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)
    with pytest.raises(DatapointCouplingError):
        gradgraph.to_graph(model, tokens, targets, lambda o, t: token_loss(o, t) - token_loss(o, t).mean())


# ----------------------------------------------------------------------- learned score biases
class LearnedScoreBias(nn.Module):
    """Self-attention whose SDPA ``attn_mask`` is a learned per-head bias (T5's relative position
    bias in miniature). Before the check its gradient was dropped: per-sample and mean gradients
    of ``score_bias`` were all zero (true values ~0.1-1)."""

    def __init__(self, d: int = 8, heads: int = 2, length: int = 4, from_embedding: bool = False) -> None:
        super().__init__()
        self.inp, self.qkv, self.out, self.head = nn.Linear(3, d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 2)
        self.heads, self.from_embedding = heads, from_embedding
        if from_embedding:  # bucketed relative positions read from a table, as T5 does
            self.table = nn.Embedding(2 * length - 1, heads)
            self.register_buffer("buckets", torch.arange(length)[None, :] - torch.arange(length)[:, None] + length - 1)
        else:
            self.score_bias = nn.Parameter(torch.randn(heads, length, length))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q, k, v = (part.view(b, t, self.heads, -1).transpose(1, 2) for part in self.qkv(h).chunk(3, dim=-1))
        bias = self.table(self.buckets).permute(2, 0, 1) if self.from_embedding else self.score_bias
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.head(self.out(y.transpose(1, 2).reshape(b, t, -1)).mean(1))


@pytest.mark.parametrize("from_embedding", [False, True], ids=["parameter", "embedding-table"])
def test_a_learned_sdpa_attn_mask_is_refused_by_name(from_embedding):
    torch.manual_seed(0)
    model = LearnedScoreBias(from_embedding=from_embedding).to(DTYPE)
    inputs, targets = torch.randn(3, 4, 3, dtype=DTYPE), torch.randint(0, 2, (3,))
    truth = reference_per_sample_grads(model, inputs, targets, cross_entropy)
    name = "table.weight" if from_embedding else "score_bias"
    assert float(truth[name].abs().max()) > 1e-3  # the bias matters: dropping it is wrong
    with pytest.raises(gradgraph.UnsupportedModuleError, match=f"attn_mask computed from the parameter.*'{name}'"):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)


def test_a_constant_sdpa_attn_mask_still_converts_exactly():
    class ConstantMask(LearnedScoreBias):
        def __init__(self):
            super().__init__()
            del self.score_bias
            self.register_buffer("score_bias", torch.randn(2, 4, 4))

    torch.manual_seed(0)
    model = ConstantMask().to(DTYPE)
    inputs, targets = torch.randn(3, 4, 3, dtype=DTYPE), torch.randint(0, 2, (3,))
    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    reference = reference_per_sample_grads(model, inputs, targets, cross_entropy)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)


def tiny_t5(attention: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, attn_implementation=attention)
    torch.manual_seed(0)
    return transformers.T5EncoderModel(config).to(DTYPE).eval()


def t5_loss(output, targets):
    return (output.last_hidden_state.mean(1).sum(-1) - targets) ** 2


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_t5_encoder_is_refused_naming_its_relative_attention_bias(attention):
    """Stock T5EncoderModel (tiny config built here): with SDPA its relative_attention_bias got zero
    per-sample and mean gradients (true ~4.8); eager attention was refused already. Both are refused
    now, at the first attention module, naming the bias (SDPA) or the score bias it adds (eager)."""
    model = tiny_t5(attention)
    tokens, targets = torch.randint(0, 40, (3, 6)), torch.randn(3, dtype=DTYPE)
    truth = reference_per_sample_grads(model, tokens, targets, t5_loss)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert float(truth[bias].abs().max()) > 1e-3
    match = "relative_attention_bias" if attention == "sdpa" else "relative position bias"
    with pytest.raises(gradgraph.UnsupportedModuleError, match=match) as refusal:
        gradgraph.to_graph(model, tokens, targets, t5_loss)
    assert "encoder.block.0.layer.0.SelfAttention" in str(refusal.value)


# ----------------------------------------------------------------------- the trace-time sum check
class LearnedSnake(nn.Module):
    """``x + sin(αx)² / α``, registered elementwise: the tracer reads one call as one elementwise op."""

    def __init__(self, alpha: torch.Tensor) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / self.alpha


class SharedSnake(nn.Module):
    """The activation's ``α`` is ``inp.bias``: the plan counts the bias (as a bias), and the path
    through the registered activation is one no rule follows."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.act = LearnedSnake(self.inp.bias)

    def forward(self, x):
        return self.head(self.act(self.inp(x)))


def test_a_path_no_rule_follows_is_refused_by_the_sum_check():
    """A fresh trace compares the graph's summed gradient with autograd's. Without that check this
    model converted with ``inp.bias``'s per-sample gradients off by 0.036 (float64)."""
    from gradgraph.convert import register_elementwise

    register_elementwise(LearnedSnake)
    torch.manual_seed(0)
    model = SharedSnake().to(DTYPE)
    inputs, targets = batch()
    targets = targets % 2
    with pytest.raises(gradgraph.UnsupportedModuleError, match="gradient of 'inp.bias'.*differs from autograd"):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)


def test_mean_grad_of_a_scalar_parameter():
    """``mean_grad()`` of a 0-dim parameter (a learned temperature) once failed on ``reshape(*())``."""

    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.head(torch.tanh(self.inp(x))) * self.scale

    torch.manual_seed(0)
    model = Temperature().to(DTYPE)
    inputs, targets = batch()
    targets = targets % 2
    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    mean, per_sample = graph.mean_grad(), graph.per_sample_grads()
    assert mean["scale"].shape == ()
    torch.testing.assert_close(mean["scale"], per_sample["scale"].mean(0), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------- grouped-query attention
class GroupedQuery(nn.Module):
    """Grouped-query attention through SDPA's ``enable_gqa``: 4 query heads over 2 key/value heads."""

    def __init__(self, d: int = 8, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.inp, self.q = nn.Linear(3, d), nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * kv_heads * self.head_dim)
        self.out, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.inp(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = (part.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2) for part in self.kv(h).chunk(2, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.head(self.out(y.transpose(1, 2).reshape(b, t, -1)).mean(1))


def test_sdpa_grouped_query_attention_converts_exactly_with_its_group():
    """``enable_gqa`` used to be refused; now it reads as key/value heads repeated per group."""
    from traced_models import assert_group_keeps_function

    torch.manual_seed(0)
    model = GroupedQuery().to(DTYPE)
    inputs, targets = torch.randn(3, 5, 3, dtype=DTYPE), torch.randint(0, 2, (3,))
    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    reference = reference_per_sample_grads(model, inputs, targets, cross_entropy)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)
    assert_group_keeps_function(model, inputs, targets, cross_entropy)


def llama_loss(output, targets):
    return (output.last_hidden_state.mean(1).sum(-1) - targets) ** 2


def test_transformers_llama_with_grouped_query_sdpa_converts_exactly():
    """Stock LlamaModel (tiny config built here, 4 query heads, 2 key/value heads) under its default
    SDPA attention, which passes enable_gqa=True: refused before, exact now."""
    from traced_models import assert_group_keeps_function

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).to(DTYPE).eval()
    tokens, targets = torch.randint(0, 40, (3, 6)), torch.randn(3, dtype=DTYPE)
    graph = gradgraph.to_graph(model, tokens, targets, llama_loss)
    reference = reference_per_sample_grads(model, tokens, targets, llama_loss)
    for name, value in graph.per_sample_grads().items():
        torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)
    assert_group_keeps_function(model, tokens, targets, llama_loss)


# ----------------------------------------------------------------------- inputs
def tiny_bert_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).to(DTYPE).eval()


def logits_loss(output, targets):
    return F.cross_entropy(output.logits, targets, reduction="none")


def test_a_tokenizer_style_mapping_is_the_call_model_of_its_entries():
    """``to_graph(model, {"input_ids": ..., "attention_mask": ..., ...})`` (a tokenizer's output)
    is ``model(input_ids, attention_mask=..., ...)``: used to raise TypeError."""
    model = tiny_bert_classifier()
    ids = torch.randint(1, 20, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    batch_encoding = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    targets = torch.randint(0, 2, (3,))
    from_mapping = gradgraph.to_graph(model, batch_encoding, targets, logits_loss)
    explicit = gradgraph.to_graph(model, ids, targets, logits_loss,
                                  forward_kwargs={"attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    ours, theirs = from_mapping.per_sample_grads(), explicit.per_sample_grads()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, atol=0, rtol=0, msg=name)
    # the mask is read: the padded datapoint's gradients differ from an unmasked conversion
    unmasked = gradgraph.to_graph(model, ids, targets, logits_loss).per_sample_grads()
    assert any(not torch.allclose(ours[name][0], unmasked[name][0]) for name in ours)


def test_a_mapping_without_the_forward_input_names_the_remedy():
    model = tiny_bert_classifier()
    ids = torch.randint(1, 20, (3, 6))
    with pytest.raises(GradGraphError, match="first parameter is 'input_ids'.*forward_kwargs"):
        gradgraph.to_graph(model, {"ids": ids}, torch.randint(0, 2, (3,)), logits_loss)
    with pytest.raises(GradGraphError, match="both in the inputs mapping and in forward_kwargs"):
        gradgraph.to_graph(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           torch.randint(0, 2, (3,)), logits_loss, forward_kwargs={"attention_mask": torch.ones_like(ids)})


def test_a_float64_graph_fed_to_a_float32_gradmetanet_names_both_dtypes():
    """torch's own error (``mat1 and mat2 must have the same dtype``) named neither the graph nor the fix
    (the check itself is ``MetaNetwork.check_inputs``, from the nn branch)."""
    from gradgraph.nn import GradMetaNet, GradMetaNetPlusPlus

    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    graph = gradgraph.to_graph(model, inputs, targets, cross_entropy)
    for network in (GradMetaNet(8), GradMetaNetPlusPlus(8)):
        with pytest.raises(GradGraphError, match="graph.x is torch.float64 but the model's parameters are torch.float32"):
            network(graph)
        network.to(DTYPE)(graph)  # the remedy works


# ----------------------------------------------------------------------- wrapped and reparametrised models
def test_a_compiled_model_converts_as_its_original_module_quickly_and_quietly(recwarn):
    """``torch.compile(model)`` converted through dynamo (~20 s, ~25 lines of warnings); now
    ``to_graph`` and ``convert_closure`` read ``_orig_mod``, and the compiled model still runs compiled."""
    import time

    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    compiled = torch.compile(model)
    compiled_forward = vars(compiled)["forward"]
    inputs, targets = batch()
    start = time.perf_counter()
    graph = gradgraph.to_graph(compiled, inputs, targets, cross_entropy)
    closure_graph, _ = gradgraph.convert_closure(compiled, lambda: cross_entropy(compiled(inputs), targets))
    assert time.perf_counter() - start < 5.0
    noisy = [str(w.message) for w in recwarn if "jit" not in str(w.message)  # torch's own import-time notice
             and any(word in str(w.message).lower() for word in ("dynamo", "graph break", "recompil", "compile"))]
    assert not noisy, noisy
    reference = reference_per_sample_grads(model, inputs, targets, cross_entropy)
    for converted in (graph, closure_graph):
        for name, value in converted.per_sample_grads().items():
            torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)
    assert vars(compiled)["forward"] is compiled_forward  # the wrapper's compiled forward is back in place


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "hook_weight_norm"])
def test_a_reparametrised_weight_is_refused_with_the_remedy(kind):
    """Already refused (deep inside the parametrization, naming ``torch._weight_norm``); now at the
    module, naming the parametrization and how to convert the effective weights."""
    import copy
    import warnings

    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm,
                   "hook_weight_norm": torch.nn.utils.weight_norm}[kind](layer)
    model = TwoLayer().to(DTYPE)
    model.head = wrapped.to(DTYPE)
    model.eval()
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError, match="'head'.*remove_") as refusal:
        gradgraph.to_graph(model, inputs, targets, cross_entropy)
    assert (", hook-based)" in str(refusal.value)) == (kind == "hook_weight_norm")
    if kind != "hook_weight_norm":  # the remedy converts the effective weights exactly
        effective = copy.deepcopy(model)
        parametrize.remove_parametrizations(effective.head, "weight")
        graph = gradgraph.to_graph(effective, inputs, targets, cross_entropy)
        reference = reference_per_sample_grads(effective, inputs, targets, cross_entropy)
        for name, value in graph.per_sample_grads().items():
            torch.testing.assert_close(value, reference[name], atol=1e-10, rtol=0, msg=name)


def test_a_pruned_weight_is_refused_with_the_remedy_and_the_remedy_gives_the_masked_gradients():
    """``torch.nn.utils.prune`` (a lottery-ticket zoo's networks): ``weight = weight_orig * weight_mask``
    computed by a forward pre-hook. Refused before as "arithmetic on parameters inside the forward", without
    the remedy; now at the module, naming the pruned tensor, the remedy, and how the remedy's gradients
    relate to ``weight_orig``'s (times the mask), which this test checks against autograd."""
    from torch.nn.utils import prune

    torch.manual_seed(1)
    model = TwoLayer().to(DTYPE).eval()
    prune.l1_unstructured(model.head, "weight", amount=0.5)
    inputs, targets = batch()
    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"'head'.*its weight is pruned.*prune\.remove\("
                                                               r"module, 'weight'\).*module\.weight_mask"):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)
    truth = []
    for i in range(inputs.shape[0]):  # weight_orig's gradients, while the model is pruned
        loss = cross_entropy(model(inputs[i:i + 1]), targets[i:i + 1]).sum()
        truth.append(torch.autograd.grad(loss, model.head.weight_orig)[0])
    mask = model.head.weight_mask.clone()
    prune.remove(model.head, "weight")
    per_sample = gradgraph.to_graph(model, inputs, targets, cross_entropy).per_sample_grads()
    for i, grad in enumerate(truth):
        torch.testing.assert_close(per_sample["head.weight"][i] * mask, grad, atol=1e-10, rtol=0)


def test_the_coupling_error_is_exported_at_the_top_level():
    """``from gradgraph import DatapointCouplingError`` is the class the converter raises (a user
    catches it without knowing it lives in ``gradgraph.errors``)."""
    from gradgraph import DatapointCouplingError as TopLevel

    assert TopLevel is DatapointCouplingError and "DatapointCouplingError" in gradgraph.__all__
    assert issubclass(TopLevel, GradGraphError)
    torch.manual_seed(0)
    model = TwoLayer().to(DTYPE)
    inputs, targets = batch()
    with pytest.raises(TopLevel, match="mix datapoints"):
        gradgraph.to_graph(model, inputs, targets, centred)


class BatchAttention(nn.Module):
    """Self-attention over the batch axis: ``x[None]`` puts the datapoints on SDPA's sequence axis."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.head(F.scaled_dot_product_attention(self.q(x)[None], self.k(x)[None], self.v(x)[None])[0])


def test_attention_across_datapoints_is_refused():
    """On main before this test, SDPA over the batch axis converted and every per-sample gradient was
    off by up to 0.81 (float64, against one autograd call per loss on the whole batch): the rule
    gave the output each query's component and never asked whether its keys were another datapoint's."""
    torch.manual_seed(0)
    model = BatchAttention().to(DTYPE)
    inputs, targets = batch()
    truth = loop_per_sample_grads(model, inputs, targets, cross_entropy)
    alone = {name: torch.stack([torch.autograd.grad(cross_entropy(model(inputs[i:i + 1]), targets[i:i + 1]).sum(),
                                                    param)[0] for i in range(len(inputs))])
             for name, param in model.named_parameters()}
    assert max(float((truth[k] - alone[k]).abs().max()) for k in truth) > 1e-3  # the coupling is real
    with pytest.raises(gradgraph.UnsupportedModuleError, match="attention between positions of different datapoints"):
        gradgraph.to_graph(model, inputs, targets, cross_entropy)
