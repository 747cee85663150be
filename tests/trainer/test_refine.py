"""trainer.refine: test-time refinement of a triplane against a frozen decoder."""
import pytest
import torch

from coordtok.model import CoordTok
from coordtok.model.triplane import from_uint8
from coordtok.trainer.refine import refine
from tests.trainer.test_evaluate import TINY, moving_gradient


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CoordTok(TINY).eval()


@pytest.fixture(scope="module")
def clip():
    """Two 8-frame 32x32 clips in [-1, 1]: [2, 8, 32, 32, 3]."""
    frames = torch.from_numpy(moving_gradient(16, 32, 32))
    return from_uint8(torch.stack([frames[:8], frames[8:]]))


def error(model, triplane, clip) -> float:
    with torch.no_grad():
        return ((model.decode_video(triplane) - clip) ** 2).mean().item()


def test_refinement_lowers_the_error_and_leaves_the_model_alone(model, clip):
    full = torch.full((2,), TINY.frames)
    with torch.no_grad():
        encoded = model.encode(clip, full)
    before = {name: p.clone() for name, p in model.named_parameters()}
    refined = refine(model, encoded, clip, full, steps=40)
    assert error(model, refined, clip) < 0.97 * error(model, encoded, clip)  # a random decoder: a small gain
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in model.named_parameters())
    assert all(not p.requires_grad for p in refined.planes())
    again = refine(model, encoded, clip, full, steps=40)
    assert all(torch.equal(a, b) for a, b in zip(refined.planes(), again.planes()))  # same seed, same bits
    unchanged = refine(model, encoded, clip, full, steps=0)
    assert all(torch.equal(a, b) for a, b in zip(unchanged.planes(), encoded.planes()))


def test_padded_frames_do_not_steer_the_refinement(model, clip):
    real = torch.tensor([3, 5])
    with torch.no_grad():
        encoded = model.encode(clip, real)
    other = clip.clone()
    other[0, 3:], other[1, 5:] = 1.0, -0.3  # only the padded frames differ
    one, two = (refine(model, encoded, target, real, steps=10) for target in (clip, other))
    assert all(torch.equal(a, b) for a, b in zip(one.planes(), two.planes()))
    changed = clip.clone()
    changed[0, 2] = 1.0  # a real frame
    moved = refine(model, encoded, changed, real, steps=10)
    assert not all(torch.equal(a, b) for a, b in zip(one.planes(), moved.planes()))
