"""Flow matching and samplers on a toy flow with a closed-form answer.

Data N(MU, S^2) and noise N(0, 1) in one dimension: on the path x_t = (1 - t) x0 + t x1, x_t is
N(t MU, var_t) with var_t = t^2 S^2 + (1 - t)^2, and (x1 - x0, x_t) are jointly Gaussian, so the
velocity E[x1 - x0 | x_t = x] is linear in x:

    v(x, t) = MU + (t S^2 - (1 - t)) / var_t * (x - t MU).

Its ODE carries a noise value z to MU + S z exactly.
"""
import pytest
import torch

from coordtok.model.transport import SAMPLERS, SamplingCancelled, euler, heun, interpolate, sample, training_loss

MU, S = 1.5, 0.5


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.double().view(-1, *(1,) * (x.dim() - 1))
    var = t**2 * S**2 + (1 - t) ** 2
    return (MU + (t * S**2 - (1 - t)) / var * (x.double() - t * MU)).to(x.dtype)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("method, tolerance", [("euler", 2e-2), ("heun", 1e-4)])
def test_ode_samplers_carry_noise_to_the_data_distribution(method, tolerance):
    z = noise(4096)
    x = sample(toy_velocity, z, steps=200, method=method)
    torch.testing.assert_close(x, MU + S * z, rtol=0, atol=tolerance)  # the exact flow map, sample by sample
    assert x.mean().item() == pytest.approx(MU, abs=0.03) and x.std().item() == pytest.approx(S, abs=0.02)


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    z = noise(256)
    for steps in (4, 8, 16):
        euler_error = (euler(toy_velocity, z, steps) - (MU + S * z)).abs().max()
        heun_error = (heun(toy_velocity, z, steps) - (MU + S * z)).abs().max()
        assert heun_error < euler_error / 4, steps


def test_euler_maruyama_gives_the_data_mean_and_std():
    generator = torch.Generator().manual_seed(1)
    x = sample(toy_velocity, noise(20000), steps=100, method="euler-maruyama",
               noise=lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype))
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, abs=0.02)


def test_euler_maruyama_noise_changes_samples_and_is_reproducible():
    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sample(toy_velocity, noise(64), steps=10, method="euler-maruyama",
                      noise=lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype))

    assert torch.equal(run(3), run(3)) and not torch.allclose(run(3), run(4))


@pytest.mark.parametrize("method", SAMPLERS)
def test_on_step_is_called_once_per_step(method):
    calls = []
    sample(toy_velocity, noise(8), steps=7, method=method, on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 7) for i in range(1, 8)]


@pytest.mark.parametrize("method", SAMPLERS)
def test_should_stop_cancels_between_steps(method):
    calls, evaluations = [], []

    def velocity(x, t):
        evaluations.append(t[0].item())
        return toy_velocity(x, t)

    with pytest.raises(SamplingCancelled, match="before step 3 of 10"):
        sample(velocity, noise(8), steps=10, method=method, on_step=lambda i, n: calls.append(i),
               should_stop=lambda: len(calls) == 2)
    assert calls == [1, 2] and max(evaluations) < 0.2 + 1e-6  # nothing past step 2


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="euler-maruyama"):
        sample(toy_velocity, noise(2), steps=4, method="rk4")
    with pytest.raises(ValueError, match="at least 1"):
        sample(toy_velocity, noise(2), steps=0)


def test_interpolate_runs_from_noise_to_data():
    x0, x1 = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    x_t = interpolate(x0, x1, torch.tensor([0.0, 0.25, 1.0]))
    assert x_t[:, 0, 0].tolist() == [0.0, 0.25, 1.0]


def test_training_loss_is_lowest_at_the_true_velocity():
    x1 = MU + S * noise(50000, seed=5)

    def loss(model) -> float:
        return training_loss(lambda x, t, y: model(x, t), x1, None, torch.Generator().manual_seed(0)).item()

    exact = loss(toy_velocity)
    # The minimum is the mean conditional variance of x1 - x0 given x_t, well above zero.
    assert 0.1 < exact < loss(lambda x, t: toy_velocity(x, t) + 0.1)
    assert exact < loss(lambda x, t: 1.1 * toy_velocity(x, t)) and exact < loss(lambda x, t: 0.9 * toy_velocity(x, t))
