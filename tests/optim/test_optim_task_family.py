"""Meta-training on a task family (``TaskFamilyTrainer``): several architectures, one rule, one outer step
along the mean of the members' estimates (issue 29, the general-purpose ``mlp`` file)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradgraph.errors import GradGraphError
from gradgraph.optim import LearnedUpdate, MetaModelConfig, MetaTrainConfig, MetaTrainer, Task, TaskFamilyTrainer
from gradgraph.optim.meta_family import MEMBER_SEED_STRIDE


def _task(widths: tuple[int, ...], activation: type[nn.Module], batch: int, name: str) -> Task:
    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out).double())
            if index + 2 < len(widths):
                layers.append(activation())
        return nn.Sequential(*layers)

    def sample(generator: torch.Generator):
        x = torch.randn(batch, widths[0], generator=generator, dtype=torch.float64)
        return x, (x[:, 0] > 0).long()

    return Task(name, make, sample, lambda out, y: F.cross_entropy(out, y, reduction="none"))


FAMILY = [_task((5, 4, 3), nn.ReLU, 8, "relu"), _task((5, 6, 6, 3), nn.Sigmoid, 4, "deep-sigmoid")]


def _rule(gradmetanet: bool = False) -> LearnedUpdate:
    torch.manual_seed(3)
    rule = LearnedUpdate(MetaModelConfig(use_gradmetanet=gradmetanet, residual_adam=True, schedule=True)).double()
    with torch.no_grad():  # the learned term and schedule start at zero: move them, so every part is tested
        for parameter in rule.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return rule


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _config(**overrides) -> MetaTrainConfig:
    return MetaTrainConfig(**{"estimator": "pes", "num_particles": 8, "truncation": 3, "horizon": 12,
                              "grad_clip": None, **overrides})


@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_a_family_of_one_task_is_that_tasks_meta_trainer(estimator):
    config = _config(estimator=estimator)
    family_rule, single_rule = _rule(), _rule()
    family = TaskFamilyTrainer(family_rule, FAMILY[:1], config)
    single = MetaTrainer(single_rule, FAMILY[0], config)
    for _ in range(3):
        family_line, single_line = family.step(), single.step()
        assert family_line["meta_loss"] == single_line["meta_loss"]
    assert not torch.equal(_flat(family_rule), _flat(_rule()))  # it trained
    torch.testing.assert_close(_flat(family_rule), _flat(single_rule), rtol=0, atol=0)


@pytest.mark.parametrize("gradmetanet", [False, True])
def test_the_outer_step_follows_the_mean_of_the_members_estimates(gradmetanet):
    """Every member is the MetaTrainer of its task with its share of the particles and its own seed; the
    family's step is one outer step along the mean of their estimates (fails if the estimates were summed,
    if one member's stood for all, or if the members shared a seed)."""
    config = _config()
    rule = _rule(gradmetanet)
    reference = copy.deepcopy(rule)
    family = TaskFamilyTrainer(rule, FAMILY, config, targets=[None, None])
    alone = [MetaTrainer(copy.deepcopy(reference), task,
                         replace(config, num_particles=4, seed=config.seed + MEMBER_SEED_STRIDE * index))
             for index, task in enumerate(FAMILY)]
    estimates = [trainer.estimate()[1] for trainer in alone]
    assert not torch.allclose(estimates[0], estimates[1])  # two tasks: two different estimates
    alone[0].apply_meta_gradient((estimates[0] + estimates[1]) / 2)
    line = family.step()
    torch.testing.assert_close(_flat(rule), _flat(alone[0].meta_model), rtol=1e-12, atol=1e-14)
    assert len(line["member_meta_losses"]) == 2 and family.outer_steps == 1
    assert all(member.outer_steps == 1 for member in family.members)
    assert [member.config.num_particles for member in family.members] == [4, 4]
    shapes = [tuple(member.params["0.weight"].shape) for member in family.members]
    assert shapes == [(4, 4, 5), (4, 6, 5)]  # each member stacks its own architecture


def test_a_member_whose_truncation_diverged_is_left_out_of_the_mean():
    config = _config()
    rule = _rule()
    family = TaskFamilyTrainer(rule, FAMILY, config)
    alone = MetaTrainer(copy.deepcopy(rule), FAMILY[0], replace(config, num_particles=4))
    first = next(iter(family.members[1].params))
    family.members[1].params = {name: value.clone() for name, value in family.members[1].params.items()}
    family.members[1].params[first][0] = math.nan  # member 1's first run diverges in this truncation
    line = family.step()
    assert math.isnan(line["member_meta_losses"][1]) and not math.isnan(line["member_meta_losses"][0])
    assert line["meta_loss"] == line["member_meta_losses"][0] and family.diverged_truncations == 1
    alone.step()  # member 0's estimate alone, not halved by a missing one
    torch.testing.assert_close(_flat(rule), _flat(alone.meta_model), rtol=1e-12, atol=1e-14)


def test_a_resumed_family_continues_as_an_uninterrupted_one():
    config = _config()
    straight = TaskFamilyTrainer(_rule(), FAMILY, config)
    for _ in range(4):
        straight.step()
    first = TaskFamilyTrainer(_rule(), FAMILY, config)
    for _ in range(2):
        first.step()
    checkpoint = copy.deepcopy(first.state_dict())
    assert checkpoint["outer_steps"] == 2 and checkpoint["meta_model"].keys() == first.meta_model.state_dict().keys()
    resumed = TaskFamilyTrainer(_rule(), FAMILY, config)
    resumed.load_state_dict(checkpoint)
    for _ in range(2):
        resumed.step()
    torch.testing.assert_close(_flat(resumed.meta_model), _flat(straight.meta_model), rtol=0, atol=0)
    assert [line["meta_loss"] for line in resumed.history] == [line["meta_loss"] for line in straight.history]
    with pytest.raises(GradGraphError, match="holds 1 members, this family 2"):
        resumed.load_state_dict({**checkpoint, "members": checkpoint["members"][:1]})


def test_each_member_compares_with_its_own_target():
    config = _config(meta_loss="first-passage", target_loss=1.0)
    family = TaskFamilyTrainer(_rule(), FAMILY, config, targets=[0.5, 2.0])
    assert [member.config.target_loss for member in family.members] == [0.5, 2.0]
    assert [member.config.seed for member in family.members] == [0, MEMBER_SEED_STRIDE]


@pytest.mark.parametrize("particles, tasks, targets, match", [
    (8, [], None, "has no task"),
    (6, FAMILY, None, "do not split into 2 equal groups of an even size"),
    (12, FAMILY * 2, None, "do not split into 4 equal groups of an even size"),
    (8, FAMILY, [1.0], "1 targets for 2 tasks"),
])
def test_a_family_that_cannot_be_split_is_refused(particles, tasks, targets, match):
    with pytest.raises(GradGraphError, match=match):
        TaskFamilyTrainer(_rule(), tasks, _config(num_particles=particles), targets=targets)
