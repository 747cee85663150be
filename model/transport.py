"""Flow matching on the linear path from noise to data (SiT's "Linear" interpolant with velocity
prediction), and fixed-step samplers.

    x_t = (1 - t) x0 + t x1,   x0 ~ N(0, I) at t = 0,   x1 data at t = 1,   target v = x1 - x0.

A model learns v(x, t) = E[x1 - x0 | x_t = x]; integrating dx/dt = v from t = 0 to 1 carries noise
to data. Everything here works on plain tensors [B, ...] and knows nothing of the network: the
samplers take a velocity function `velocity(x [B, ...], t [B]) -> [B, ...]`. Samplers are fixed-step
loops on the uniform grid t_i = i / steps that report each step and can be cancelled between steps.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]
Noise = Callable[[torch.Tensor], torch.Tensor]

SAMPLERS = ("euler", "heun", "euler-maruyama")


class SamplingCancelled(Exception):
    """`should_stop()` returned True: sampling stopped between two steps."""


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t x1 for x0, x1 [B, ...] and t [B]."""
    t = t.view(-1, *(1,) * (x1.dim() - 1))
    return (1 - t) * x0 + t * x1


def training_loss(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    x1: torch.Tensor,
    y: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """The flow-matching loss of a batch of data x1 [B, ...]: per sample t ~ U[0, 1) and
    x0 ~ N(0, I), drawn on CPU from `generator`; the mean squared error of model(x_t, t, y)
    against x1 - x0 over all elements."""
    t = torch.rand(x1.shape[0], generator=generator).to(x1.device)
    x0 = torch.randn(x1.shape, generator=generator).to(x1.device, x1.dtype)
    return F.mse_loss(model(interpolate(x0, x1, t), t, y).float(), (x1 - x0).float())


def euler(velocity: Velocity, x: torch.Tensor, steps: int, on_step: StepCallback | None = None,
          should_stop: StopCheck | None = None) -> torch.Tensor:
    """The ODE by Euler steps (`steps` velocity evaluations): x0 [B, ...] noise -> samples."""

    def step(x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        return x + (t_next - t) * velocity(x, _times(x, t))

    return _integrate(step, x, steps, on_step, should_stop)


def heun(velocity: Velocity, x: torch.Tensor, steps: int, on_step: StepCallback | None = None,
         should_stop: StopCheck | None = None) -> torch.Tensor:
    """The ODE by Heun's second-order steps (2 * steps velocity evaluations): an Euler guess, then
    the mean of the velocities at both ends of the step."""

    def step(x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        v = velocity(x, _times(x, t))
        guess = x + (t_next - t) * v
        return x + (t_next - t) / 2 * (v + velocity(guess, _times(x, t_next)))

    return _integrate(step, x, steps, on_step, should_stop)


def euler_maruyama(velocity: Velocity, x: torch.Tensor, steps: int, on_step: StepCallback | None = None,
                   should_stop: StopCheck | None = None,
                   noise: Noise = torch.randn_like) -> torch.Tensor:
    """The SDE with the ODE's marginals, by Euler-Maruyama steps (`steps` velocity evaluations):

        dx = [v + w s] dt + sqrt(2 w) dW,   s = (t v - x) / (1 - t),   w(t) = 1 - t,

    s being the score of p_t recovered from the velocity (E[x0 | x_t = x] = x - t v, and
    s = -E[x0 | x_t] / (1 - t)), w SiT's "sigma" diffusion coefficient (sigma_t = 1 - t on this
    path; unlike its default, SBDM's (1 - t) / t, finite at t = 0), so the drift is (1 + t) v - x.
    The last step adds no noise: from t to 1 it is the Euler step x + (1 - t) v = E[x1 | x_t].
    `noise(x)` draws the N(0, I) increments (a tensor like x).
    """

    def step(x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        dt = t_next - t
        v = velocity(x, _times(x, t))
        if t_next == 1.0:
            return x + dt * v
        return x + dt * ((1 + t) * v - x) + math.sqrt(2 * (1 - t) * dt) * noise(x)

    return _integrate(step, x, steps, on_step, should_stop)


def sample(velocity: Velocity, x0: torch.Tensor, steps: int, method: str = "euler",
           on_step: StepCallback | None = None, should_stop: StopCheck | None = None,
           noise: Noise = torch.randn_like) -> torch.Tensor:
    """Carry noise x0 [B, ...] to samples with the sampler named `method` (one of SAMPLERS);
    `noise` is the draws of the SDE sampler (the ODE samplers draw none)."""
    samplers = {"euler": euler, "heun": heun, "euler-maruyama": functools.partial(euler_maruyama, noise=noise)}
    if method not in samplers:
        raise ValueError(f"unknown sampler {method!r}; choose one of {list(SAMPLERS)}")
    return samplers[method](velocity, x0, steps, on_step, should_stop)


def _integrate(step: Callable[[torch.Tensor, float, float], torch.Tensor], x: torch.Tensor, steps: int,
               on_step: StepCallback | None, should_stop: StopCheck | None) -> torch.Tensor:
    """Run `step(x, t_i, t_i+1)` over t_i = i / steps (t_steps is exactly 1.0); call
    `should_stop()` before and `on_step(i + 1, steps)` after every step."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    for i in range(steps):
        if should_stop is not None and should_stop():
            raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {steps}")
        x = step(x, times[i], times[i + 1])
        if on_step is not None:
            on_step(i + 1, steps)
    return x


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    """t as a [B] tensor on x's device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
