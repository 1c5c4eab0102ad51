"""CFG, the two guidance units, dynamic guidance schedules and LCM's guidance embedding."""

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from icd_lite.guidance import (GuidanceSchedule, cfg, classical_to_code, code_to_classical,
                               constant_guidance, guidance_embedding, guided_model,
                               interval_guidance, ramp_guidance, step_guidance)

W_CODES = [0.0, 7.0, 11.0, 15.0, 19.0, 3.5]


@pytest.mark.parametrize("dim", [512, 32, 33])
def test_guidance_embedding_matches_diffusers(dim):
    w = torch.tensor(W_CODES)
    reference = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, w, embedding_dim=dim)
    ours = guidance_embedding(w, dim)
    assert ours.shape == reference.shape == (len(W_CODES), dim)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_guidance_embedding_shape_rules():
    emb = guidance_embedding(torch.tensor([0.0, 7.0]), 33)
    assert emb[:, -1].abs().max() == 0  # odd dims are zero-padded
    torch.testing.assert_close(emb[0, :16], torch.zeros(16))  # sin(0)
    torch.testing.assert_close(emb[0, 16:32], torch.ones(16))  # cos(0)
    with pytest.raises(ValueError, match="one value per sample"):
        guidance_embedding(torch.tensor(7.0))
    with pytest.raises(ValueError, match="at least 4"):
        guidance_embedding(torch.tensor([7.0]), 2)
    with pytest.raises(ValueError, match="w_code must be >= 0"):
        guidance_embedding(torch.tensor([1.0, -1.0]))


def test_cfg_unguided_returns_conditional():
    eps_c, eps_u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cfg(eps_c, eps_u, 0.0), eps_c)


def test_cfg_formula():
    eps_c, eps_u = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    # eps_c + 7 (eps_c - eps_u) = [1 + 3.5, 2 - 7]
    torch.testing.assert_close(cfg(eps_c, eps_u, 7.0), torch.tensor([[4.5, -5.0]]))


def test_cfg_per_sample_w():
    eps_c, eps_u = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    w = torch.tensor([0.0, 7.0, 19.0])
    out = cfg(eps_c, eps_u, w)
    for i in range(3):
        torch.testing.assert_close(out[i], cfg(eps_c[i], eps_u[i], w[i].item()))


@pytest.mark.parametrize("w", [-1.0, torch.tensor([1.0, -0.5, 2.0])])
def test_cfg_negative_w_raises(w):
    eps = torch.randn(3, 2)
    with pytest.raises(ValueError, match="w_code must be >= 0"):
        cfg(eps, eps, w)


def test_units():
    assert classical_to_code(8) == 7
    assert classical_to_code(1) == 0
    assert code_to_classical(7) == 8
    assert code_to_classical(classical_to_code(7.5)) == 7.5
    with pytest.raises(ValueError, match="classical guidance scale w must be >= 1"):
        classical_to_code(0.5)
    with pytest.raises(ValueError, match="w_code must be >= 0"):
        code_to_classical(-1)


def test_step_guidance_paper_setting():
    schedule = step_guidance(7, 0.8)
    # reverse steps of CD4 with tau = 0.8: only t = 999 is unguided
    assert [schedule(t) for t in (999, 779, 519, 259)] == [0.0, 7, 7, 7]
    assert schedule(800) == 7 and schedule(801) == 0


def test_ramp_guidance():
    schedule = ramp_guidance(7, 0.4, 0.8)
    assert schedule(600) == pytest.approx(3.5)
    assert schedule(500) == pytest.approx(7 * 0.75)
    assert schedule(700) == pytest.approx(7 * 0.25)
    assert schedule(400) == 7 and schedule(100) == 7
    assert schedule(800) == 0 and schedule(999) == 0


def test_interval_guidance():
    schedule = interval_guidance(7, 0.3, 0.7)
    assert [schedule(t) for t in (0, 299, 300, 500, 700, 701, 999)] == [0, 0, 7, 7, 7, 0, 0]


def test_constant_guidance():
    schedule = constant_guidance(11)
    assert {schedule(t) for t in (0, 19, 500, 999)} == {11}


@pytest.mark.parametrize("make, message", [
    (lambda: step_guidance(7, 1.2), "tau1 is a fraction"),
    (lambda: step_guidance(7, -0.1), "tau1 is a fraction"),
    (lambda: ramp_guidance(7, 0.5, 1.5), "tau2 is a fraction"),
    (lambda: ramp_guidance(7, 0.8, 0.4), "need tau1 <= tau2"),
    (lambda: interval_guidance(7, 0.7, 0.3), "need tau1 <= tau2"),
    (lambda: GuidanceSchedule(7, "cosine"), "unknown guidance schedule kind"),
    (lambda: constant_guidance(-1), "w_code must be >= 0"),
])
def test_bad_schedules(make, message):
    with pytest.raises(ValueError, match=message):
        make()


class StubModel:
    """eps = x + cond, so conditional and null passes differ; records every call."""

    def __init__(self):
        self.conds = []

    def __call__(self, x, t, cond):
        self.conds.append(cond)
        return x + cond


def test_guided_model_skips_null_pass_when_unguided():
    model = StubModel()
    eps_fn = guided_model(model, null_cond=-1.0, guidance=step_guidance(7, 0.8))
    x = torch.zeros(2, 3)
    torch.testing.assert_close(eps_fn(x, torch.tensor([999, 999]), 2.0), torch.full((2, 3), 2.0))
    assert model.conds == [2.0]


def test_guided_model_applies_cfg_when_guided():
    model = StubModel()
    eps_fn = guided_model(model, null_cond=-1.0, guidance=step_guidance(7, 0.8))
    x = torch.zeros(2, 3)
    out = eps_fn(x, torch.tensor([259, 259]), 2.0)
    assert sorted(model.conds) == [-1.0, 2.0]
    # eps_c + 7 (eps_c - eps_u) = 2 + 7 * 3
    torch.testing.assert_close(out, torch.full((2, 3), 23.0))
