r"""A 2D world where every quantity of the theory is known exactly: a class-conditional mixture of
isotropic Gaussians.

Data: x_0 ~ sum_k pi_k N(mu_k, v_k I), each component k belonging to a class c_k. Noising keeps
it a mixture (x_t = alpha_t x_0 + sigma_t eps)::

    p_t(x | c) = sum_{k: c_k = c} pi_k N(x; alpha_t mu_k, (alpha_t^2 v_k + sigma_t^2) I)

so the score and the epsilon the teacher should predict are closed form. With the responsibilities
r_k(x) = softmax_k (log pi_k + log N_k(x)) over the components allowed by the condition::

    grad_x log p_t(x | c) = - sum_k r_k(x) (x - alpha_t mu_k) / (alpha_t^2 v_k + sigma_t^2)
    eps*(x, t, c)         = - sigma_t grad_x log p_t(x | c)

The label ``NULL_LABEL`` (-1) means "no condition": all components, the unconditional model
that classifier-free guidance needs. Running DDIM on eps* with very many steps integrates the
exact probability-flow ODE, so every error in notebook 01 is the method's, never the teacher's.

The module also holds the small MLP that plays the student in 2D, and the one-call distillation
used by notebook 01.

Devices: ``default_world(device)`` (or ``world.to(device)``) puts the mixture's tensors on a
device, and the MLPs train where the world is. Every random draw comes from a CPU
``torch.Generator`` and is then moved, so a seed gives the same points on any device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .losses import icd_training_step
from .schedule import SD15_SCHEDULE, NoiseSchedule

NULL_LABEL = -1


@dataclass
class GaussianMixture2D:
    """Exact class-conditional teacher: call it as ``eps = world(x, t, labels)``."""

    means: torch.Tensor    # [K, 2]
    stds: torch.Tensor     # [K]   isotropic standard deviation of each component
    weights: torch.Tensor  # [K]   mixture weights pi_k (sum to 1)
    classes: torch.Tensor  # [K]   class c_k of each component
    schedule: NoiseSchedule = SD15_SCHEDULE

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device) -> "GaussianMixture2D":
        """The same world with its tensors on ``device``."""
        return GaussianMixture2D(self.means.to(device), self.stds.to(device),
                                 self.weights.to(device), self.classes.to(device), self.schedule)

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        bad = (labels < NULL_LABEL) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f"labels must be {NULL_LABEL} (unconditional) or a class in "
                             f"[0, {self.num_classes - 1}], got {labels[bad][:5].tolist()}")
        return labels

    def sample(self, n: int, labels=None, generator: torch.Generator | None = None):
        """n clean points x_0 and their class labels (drawn from the prior when not given), on
        the world's device; ``generator`` is a CPU generator (the draws are made on the CPU)."""
        if labels is None:
            component = torch.multinomial(self.weights.cpu(), n, replacement=True,
                                          generator=generator)
        else:
            labels = self._check_labels(labels).to(self.device).expand(n)
            in_class = (self.classes[None, :] == labels[:, None]) | (labels[:, None] == NULL_LABEL)
            allowed = self.weights[None, :] * in_class
            component = torch.multinomial(allowed.cpu(), 1, generator=generator)[:, 0]
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64).to(self.device)
        component = component.to(self.device)
        x0 = self.means[component] + self.stds[component, None] * noise
        return x0, self.classes[component]

    def _component_terms(self, x: torch.Tensor, t, labels):
        """log pi_k N_k(x) masked by the labels [B, K], the variances [B, K], alpha_t [B, 1]."""
        t = torch.as_tensor(t).expand(x.shape[0])
        alpha = self.schedule.alpha(t)[:, None].to(x.device)  # the schedule's table: CPU
        sigma = self.schedule.sigma(t)[:, None].to(x.device)
        variance = alpha**2 * self.stds[None, :] ** 2 + sigma**2
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None, :, :]    # [B, K, 2]
        log_normal = -0.5 * (diff**2).sum(-1) / variance - torch.log(2 * math.pi * variance)
        labels = self._check_labels(labels).expand(x.shape[0])
        allowed = (labels[:, None] == NULL_LABEL) | (labels[:, None] == self.classes[None, :])
        log_terms = torch.where(allowed, torch.log(self.weights)[None, :] + log_normal,
                                torch.tensor(-math.inf, dtype=x.dtype, device=x.device))
        return log_terms, variance, diff

    def log_prob(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        """log p_t(x | c) for each point (float64)."""
        log_terms, _, _ = self._component_terms(x.double(), t, labels)
        return torch.logsumexp(log_terms, dim=1)

    def eps(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        """The exact eps*(x, t, c) = -sigma_t grad log p_t(x | c); not defined at t = 0."""
        if torch.as_tensor(t).eq(0).any():
            raise ValueError("eps is undefined at t = 0 (the clean end); use t >= 1")
        x64 = x.double()
        log_terms, variance, diff = self._component_terms(x64, t, labels)
        responsibility = torch.softmax(log_terms, dim=1)                       # r_k(x)
        score = -(responsibility[:, :, None] * diff / variance[:, :, None]).sum(1)
        sigma = self.schedule.sigma(torch.as_tensor(t).expand(x.shape[0]))[:, None]
        return (-sigma.to(x.device) * score).to(x.dtype)

    def __call__(self, x: torch.Tensor, t, labels) -> torch.Tensor:
        return self.eps(x, t, labels)


def default_world(device="cpu", radius: float = 2.0) -> GaussianMixture2D:
    r"""Eight tight modes (std 0.25) on a circle of ``radius`` (2 by default) plus one in the
    middle; neighbours belong to different classes (3 classes), so guidance has something to
    push away from.

    ``radius`` sets how far apart the classes are compared with the noise: neighbouring modes lie
    $2 r \sin(\pi / 8)$ apart, about 1.5 for r = 2. Notebook 01 widens it to see at which noise
    level classifier-free guidance still moves points (the paper's Fig. 4a).
    """
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)                # [8]
    means = torch.cat([radius * torch.stack([angles.cos(), angles.sin()], 1),         # [8, 2]
                       torch.zeros(1, 2, dtype=torch.float64)])                      # [9, 2]
    stds = torch.full((9,), 0.25, dtype=torch.float64)
    weights = torch.full((9,), 1 / 9, dtype=torch.float64)
    classes = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    return GaussianMixture2D(means, stds, weights, classes).to(device)


def _fourier(u: torch.Tensor, num: int = 8) -> torch.Tensor:
    """Features of a time u in [0, 1]: [u, sin(pi 2^k u), cos(pi 2^k u)] for k < num."""
    freqs = math.pi * 2.0 ** torch.arange(num, dtype=u.dtype, device=u.device)
    angles = u[:, None] * freqs[None, :]
    return torch.cat([u[:, None], angles.sin(), angles.cos()], dim=1)


class MLPStudent(nn.Module):
    """eps_theta(x, t, s, c, w): a small MLP student for the 2D world.

    Inputs: the point, Fourier features of t/T and s/T, a class embedding (one slot for the
    null label) and w_code / 10. Output: eps_hat (2 numbers).
    """

    def __init__(self, num_classes: int, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes + 1, 16)
        layers, width = [], 2 + 2 * 17 + 16 + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x, t, s, labels, w_code):
        u_t, u_s = t.float() / 1000, s.float() / 1000
        features = [x.float(), _fourier(u_t), _fourier(u_s),
                    self.class_embedding(labels + 1), w_code.float()[:, None] / 10]
        return self.net(torch.cat(features, dim=1)).to(x.dtype)


def fit_eps_student(world: GaussianMixture2D, steps: int = 1500, batch: int = 512,
                    lr: float = 3e-3, cond_dropout: float = 0.2, seed: int = 0,
                    disable=None) -> MLPStudent:
    """Regress an MLP on the exact eps* (both conditional and null-label), as a stand-in for a
    trained teacher network: iCD's students start as copies of their teacher. It trains on the
    world's device."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = world.device
    model = MLPStudent(world.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in tqdm(range(steps), disable=disable, desc="fit eps"):
        x0, labels = world.sample(batch, generator=generator)
        dropped = (torch.rand(batch, generator=generator) < cond_dropout).to(device)
        labels = torch.where(dropped, torch.full_like(labels, NULL_LABEL), labels)
        t = torch.randint(1, 1000, (batch,), generator=generator).to(device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
        x_t = world.schedule.add_noise(x0, eps, t)
        target = world.eps(x_t, t, labels)
        prediction = model(x_t.float(), t, t, labels, torch.zeros(batch, device=device))
        loss = torch.mean((prediction - target.float()) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


def distill_pair(world: GaussianMixture2D, init: MLPStudent, config, steps: int = 600,
                 batch: int = 256, lr: float = 1e-3, seed: int = 0, disable=None):
    """Distil a reverse (CD_m) and a forward (fCD_m) student from the exact teacher with
    ``icd_training_step``; both start as copies of ``init`` (on the world's device). Returns
    (reverse, forward, losses)."""
    generator = torch.Generator().manual_seed(seed)
    reverse, forward = copy.deepcopy(init).to(world.device), copy.deepcopy(init).to(world.device)
    reverse_opt = torch.optim.Adam(reverse.parameters(), lr=lr)
    forward_opt = torch.optim.Adam(forward.parameters(), lr=lr)
    decays = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
              for opt in (reverse_opt, forward_opt)]
    history = []
    for _ in tqdm(range(steps), disable=disable, desc=f"iCD m={config.boundaries.m}"):
        x0, labels = world.sample(batch, generator=generator)
        null = torch.full_like(labels, NULL_LABEL)
        history.append(icd_training_step(reverse, forward, world, reverse_opt, forward_opt, x0,
                                         labels, null, config, generator, world.schedule))
        for decay in decays:
            decay.step()
    return reverse, forward, history
