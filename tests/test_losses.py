"""The iCD losses: the distance, the boundary condition, which model each loss trains, training."""

import math

import pytest
import torch

from icd_lite.consistency import consistency_fn
from icd_lite.guidance import cfg
from icd_lite.losses import (ICDConfig, forward_cd_loss, forward_preservation_loss,
                             icd_training_step, pseudo_huber, reverse_cd_loss,
                             reverse_preservation_loss)
from icd_lite.schedule import Boundaries, default_boundaries
from icd_lite.solver import ddim_jump
from icd_lite.toy2d import NULL_LABEL, MLPStudent, default_world, distill_pair

WORLD = default_world()


def batch(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0, labels = WORLD.sample(n, generator=generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return x0, eps, labels, torch.full_like(labels, NULL_LABEL)


def exact_student(x, t, s, cond, w_code):
    """A 'student' that is the exact (guided) teacher: f is then an exact DDIM jump.
    It raises at t = 0 like the world, so it also checks that no loss queries it there."""
    return cfg(WORLD(x, t, cond), WORLD(x, t, torch.full_like(cond, NULL_LABEL)), w_code)


# ---------------------------------------------------------------- pseudo-Huber distance

def test_pseudo_huber_zero_for_equal_inputs():
    a = torch.randn(4, 3)
    assert pseudo_huber(a, a.clone()).item() == 0.0


def test_pseudo_huber_by_hand():
    prediction, target = torch.tensor([0.0, 3.0, 1.0]), torch.tensor([0.0, 4.0, 3.0])
    # differences 0, -1, -2 with c = 1: (0 + (sqrt 2 - 1) + (sqrt 5 - 1)) / 3
    expected = (math.sqrt(2) - 1 + math.sqrt(5) - 1) / 3
    assert pseudo_huber(prediction, target, c=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_huber_is_l1_like_far_away_and_l2_like_near():
    d = torch.tensor([1.0, -2.0, 0.5])
    far = pseudo_huber(d, torch.zeros(3))  # c = 1e-3 << |d|
    assert far.item() == pytest.approx(d.abs().mean().item(), abs=2e-3)
    small = torch.tensor([1e-5, -1e-5])
    near = pseudo_huber(small, torch.zeros(2))  # ~ d^2 / (2c) = 1e-10 / 2e-3
    assert near.item() == pytest.approx(5e-8, rel=1e-2)


def test_pseudo_huber_bad_arguments():
    with pytest.raises(ValueError, match="shapes differ"):
        pseudo_huber(torch.zeros(2, 3), torch.zeros(3, 2))
    for c in (0.0, -1e-3):
        with pytest.raises(ValueError, match="c must be > 0"):
            pseudo_huber(torch.zeros(2), torch.zeros(2), c=c)


# ---------------------------------------------------------------- boundary condition

def test_consistency_fn_with_exact_student_is_a_ddim_jump():
    x0, eps, labels, _ = batch()
    x_t = WORLD.schedule.add_noise(x0, eps, 519)
    for s in (519, 259, 0, 779):
        expected = ddim_jump(x_t, WORLD(x_t, 519, labels), 519, s)
        torch.testing.assert_close(consistency_fn(exact_student, x_t, 519, s, labels), expected)
    # t -> t is the identity (the boundary condition holds by construction)
    for t in (19, 259, 999):
        x_t = WORLD.schedule.add_noise(x0, eps, t)
        torch.testing.assert_close(consistency_fn(exact_student, x_t, t, t, labels, 7.0), x_t)


def test_cd_losses_vanish_when_every_step_ends_on_a_boundary():
    # With a boundary at every DDIM timestep, t' is always the boundary: the target is the
    # teacher's own step, which the exact student reproduces (guided or not), so the loss is 0.
    everywhere = default_boundaries(50)
    x0, eps, labels, null = batch(128)
    generator = torch.Generator().manual_seed(0)
    loss = reverse_cd_loss(exact_student, WORLD, x0, eps, labels, null, everywhere,
                           w_code_choices=(0.0, 7.0), generator=generator)
    assert loss.item() < 1e-9
    loss = forward_cd_loss(exact_student, WORLD, x0, eps, labels, everywhere, generator=generator)
    assert loss.item() < 1e-9
    # but not with 4 segments, where the target is the student's own (inexact) next jump
    loss = reverse_cd_loss(exact_student, WORLD, x0, eps, labels, null, default_boundaries(4),
                           w_code_choices=(0.0, 7.0), generator=generator)
    assert loss.item() > 1e-3


def test_cd_targets_on_the_boundary_are_the_teacher_step():
    # where t' == s the target must be x_t' itself, whatever the student would say there
    def student(x, t, s, cond, w_code):
        eps = exact_student(x, t, s, cond, w_code)
        if torch.is_grad_enabled():
            return eps
        return torch.where((t == s)[:, None], torch.full_like(eps, math.inf), eps)

    x0, eps, labels, null = batch(128)
    for boundaries in (default_boundaries(50), default_boundaries(4)):
        loss = reverse_cd_loss(student, WORLD, x0, eps, labels, null, boundaries)
        assert math.isfinite(loss.item())
        loss = forward_cd_loss(student, WORLD, x0, eps, labels, boundaries)
        assert math.isfinite(loss.item())


# ---------------------------------------------------------------- which model learns what

def students():
    return MLPStudent(WORLD.num_classes, hidden=32, depth=2), \
        MLPStudent(WORLD.num_classes, hidden=32, depth=2)


def has_grad(model):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def no_grad(model):
    return all(p.grad is None for p in model.parameters())


def test_cd_targets_are_under_stop_gradient():
    modes = []

    def recording_student(*args):
        modes.append(torch.is_grad_enabled())
        return exact_student(*args)

    x0, eps, labels, null = batch()
    reverse_cd_loss(recording_student, WORLD, x0, eps, labels, null, default_boundaries(4))
    assert modes == [True, False]  # prediction with grad, target without
    modes.clear()
    forward_cd_loss(recording_student, WORLD, x0, eps, labels, default_boundaries(4))
    assert modes == [True, False]


def test_reverse_cd_never_queries_t0():
    # schedule.py: "The network is never evaluated at t = 0"; the masked target at t' = s = 0
    # does not need the network at all.
    times = []

    def recording_student(x, t, s, cond, w_code):
        times.append(t)
        return exact_student(x, t, s, cond, w_code)

    x0, eps, labels, null = batch(256)
    reverse_cd_loss(recording_student, WORLD, x0, eps, labels, null, default_boundaries(4),
                    generator=torch.Generator().manual_seed(0))
    assert torch.cat(times).min() > 0


def test_reverse_cd_loss_trains_its_student():
    reverse, _ = students()
    x0, eps, labels, null = batch()
    reverse_cd_loss(reverse, WORLD, x0, eps, labels, null, default_boundaries(2)).backward()
    assert has_grad(reverse)


def test_forward_cd_loss_trains_its_student():
    forward, _ = students()
    x0, eps, labels, _ = batch()
    forward_cd_loss(forward, WORLD, x0, eps, labels, default_boundaries(2)).backward()
    assert has_grad(forward)


def test_forward_preservation_reaches_only_the_forward_student():
    reverse, forward = students()
    x0, eps, labels, _ = batch()
    forward_preservation_loss(forward, reverse, x0, eps, labels, default_boundaries(2)).backward()
    assert has_grad(forward) and no_grad(reverse)


def test_reverse_preservation_reaches_only_the_reverse_student():
    reverse, forward = students()
    x0, eps, labels, _ = batch()
    reverse_preservation_loss(forward, reverse, x0, eps, labels, default_boundaries(2)).backward()
    assert has_grad(reverse) and no_grad(forward)


def test_preservation_losses_use_unguided_jumps_between_segment_ends():
    calls = []

    def recording_student(x, t, s, cond, w_code):
        calls.append((t.unique().tolist(), s.unique().tolist(), w_code.unique().tolist()))
        return exact_student(x, t, s, cond, w_code)

    x0, eps, labels, _ = batch(1)
    boundaries = Boundaries(reverse=[0], forward=[999])  # one segment: 19 <-> 999
    forward_preservation_loss(recording_student, recording_student, x0, eps, labels, boundaries)
    reverse_preservation_loss(recording_student, recording_student, x0, eps, labels, boundaries)
    assert calls == [([999], [19], [0.0]), ([19], [999], [0.0]),
                     ([19], [999], [0.0]), ([999], [19], [0.0])]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def changed(model, before):
    return all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("lambdas, keys", [
    (1.5, {"reverse_cd", "forward_cd", "forward_preservation", "reverse_preservation"}),
    (0.0, {"reverse_cd", "forward_cd"}),
])
def test_training_step_updates_both_students(lambdas, keys):
    reverse, forward = students()
    reverse_before, forward_before = snapshot(reverse), snapshot(forward)
    config = ICDConfig(default_boundaries(2), w_code_choices=(0.0, 7.0), lambda_f=lambdas,
                       lambda_r=lambdas)
    x0, _, labels, null = batch()
    losses = icd_training_step(reverse, forward, WORLD,
                               torch.optim.Adam(reverse.parameters(), lr=1e-3),
                               torch.optim.Adam(forward.parameters(), lr=1e-3),
                               x0, labels, null, config, torch.Generator().manual_seed(0))
    assert set(losses) == keys
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in losses.values())
    assert changed(reverse, reverse_before) and changed(forward, forward_before)
    assert all(p.grad is None for p in [*reverse.parameters(), *forward.parameters()])


class RecordingAdam(torch.optim.Adam):
    """Adam that logs, at each step, its name and whether all of its params received grads."""

    def __init__(self, params, name, log):
        super().__init__(params, lr=1e-3)
        self.name, self.log = name, log

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.log.append((self.name, all(p.grad is not None for p in params)))
        return super().step(closure)


def test_training_step_order_and_owners():
    # Algorithm 1: reverse CD -> theta+, forward CD -> theta-, L_f -> theta-, L_r -> theta+;
    # each optimizer steps right after a loss whose gradients reached all of its params.
    reverse, forward = students()
    log = []
    x0, _, labels, null = batch()
    icd_training_step(reverse, forward, WORLD, RecordingAdam(reverse.parameters(), "+", log),
                      RecordingAdam(forward.parameters(), "-", log), x0, labels, null,
                      ICDConfig(default_boundaries(2)), torch.Generator().manual_seed(0))
    assert log == [("+", True), ("-", True), ("-", True), ("+", True)]


def test_training_lowers_the_reverse_cd_loss():
    config = ICDConfig(default_boundaries(2), w_code_choices=(0.0, 7.0))
    init = MLPStudent(WORLD.num_classes)
    init_before = snapshot(init)
    _, _, history = distill_pair(WORLD, init, config, steps=150, batch=128, disable=True)
    assert len(history) == 150
    losses = [step["reverse_cd"] for step in history]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first
    assert all(torch.equal(p, q) for p, q in zip(init.parameters(), init_before))  # copies


# ---------------------------------------------------------------- config checks

def test_config_defaults_are_the_sd15_release():
    config = ICDConfig(default_boundaries(4))
    assert config.w_code_choices == (0.0, 7.0, 11.0, 15.0, 19.0)
    assert (config.lambda_f, config.lambda_r, config.huber_c) == (1.5, 1.5, 1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lambda_f=-0.1), "lambda_f must be >= 0"),
    (dict(lambda_r=-1.0), "lambda_r must be >= 0"),
    (dict(w_code_choices=(0.0, -7.0)), "w_code must be >= 0"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ICDConfig(default_boundaries(2), **kwargs)


@pytest.mark.parametrize("boundaries", [[0, 499], ([0, 499], [499, 999]), 2])
def test_config_rejects_non_boundaries(boundaries):
    with pytest.raises(TypeError, match="boundaries must be a Boundaries"):
        ICDConfig(boundaries)
