"""The engine: batching across requests, equal results, back-pressure, deadlines, failures."""
import asyncio
import time

import pytest
import torch

from model import CoordTok, CoordTokConfig
from service.engine import DeadlineExceeded, DeviceFailure, Engine, NotReady, QueueFull

CONFIG = CoordTokConfig(
    frames=8, height=16, width=16, enc_dim=32, enc_heads=2, enc_patch_t=4, enc_patch_xy=8, enc_vit_layers=1,
    enc_cross_layers=1, latent_res_xy=4, latent_res_t=8, latent_channels=4, latent_patch_xy=2, latent_patch_t=4,
    dec_dim=32, dec_heads=2, dec_layers=1, dec_patch_xy=4, decode_slice_frames=4,
)


@pytest.fixture(scope="module")
def model() -> CoordTok:
    torch.manual_seed(0)
    return CoordTok(CONFIG).eval()


def make_engine(model, batches=None, **settings) -> Engine:
    values = dict(batch_max_frames=64, batch_wait_ms=100, max_queue=8, request_timeout_s=30)
    values.update(settings)
    engine = Engine({"cpu": model}, on_batch=None if batches is None else batches.append, **values)
    engine.start()
    return engine


def clips(k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (k, 8, 16, 16, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_concurrent_encodes_are_batched_and_equal_one_at_a_time(model):
    batches = []
    engine = make_engine(model, batches)
    inputs = [(clips(1, 1), torch.tensor([8])), (clips(2, 2), torch.tensor([8, 5])), (clips(1, 3), torch.tensor([3]))]

    async def run():
        return await asyncio.gather(*(engine.encode(c, n) for c, n in inputs))

    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    assert [b.requests for b in batches] == [3] and batches[0].frames == 32
    with torch.inference_mode():
        for (c, n), got in zip(inputs, results):
            expected = model.encode(c.float() / 127.5 - 1, n)
            torch.testing.assert_close(got.xy, expected.xy, rtol=1e-5, atol=1e-5)


def test_decodes_batch_only_with_the_same_frame_range(model):
    batches = []
    engine = make_engine(model, batches)
    with torch.inference_mode():
        triplane = model.encode(clips(3, 4).float() / 127.5 - 1)

    async def run():
        return await asyncio.gather(engine.decode(triplane[0], (0, 4)), engine.decode(triplane[1], (0, 4)),
                                    engine.decode(triplane[2], (4, 8)))

    try:
        a, b, c = asyncio.run(run())
    finally:
        engine.stop()
    assert sorted(x.requests for x in batches) == [1, 2]
    with torch.inference_mode():
        expected = model.decode_video(triplane, frames=(0, 4))
    assert a.dtype == torch.uint8 and a.shape == (1, 4, 16, 16, 3)
    assert torch.equal(a, ((expected[:1].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    assert c.shape == (1, 4, 16, 16, 3)


def test_admission_is_bounded_and_closed_when_stopped(model):
    engine = make_engine(model, max_queue=1)
    with engine.admit():
        with pytest.raises(QueueFull, match="limit is 1"):
            with engine.admit():
                pass
    with engine.admit():  # the place was given back
        pass
    engine.stop()
    with pytest.raises(NotReady):
        with engine.admit():
            pass


def test_a_request_past_its_deadline_fails_with_504(model):
    engine = make_engine(model, request_timeout_s=0.2, batch_wait_ms=0)
    worker = engine.workers[0]
    real_run = worker.run
    worker.run = lambda batch: (time.sleep(0.5), real_run(batch))[1]

    async def run():
        return await asyncio.gather(engine.encode(clips(1, 5), torch.tensor([8])), return_exceptions=True)

    try:
        (result,) = asyncio.run(run())
    finally:
        engine.stop()
    assert isinstance(result, DeadlineExceeded) and result.http_status == 504


def test_a_failed_batch_fails_its_requests_and_the_worker_recovers(model):
    engine = make_engine(model, batch_wait_ms=0)
    worker = engine.workers[0]
    real_run = worker.run
    worker.run = lambda batch: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))

    async def encode():
        return await engine.encode(clips(1, 6), torch.tensor([8]))

    try:
        with pytest.raises(DeviceFailure, match="ran out of memory") as failure:
            asyncio.run(encode())
        assert failure.value.http_status == 503
        assert engine.ready  # the probe found the device usable
        worker.run = real_run
        assert asyncio.run(encode()).batch_size == 1
        assert engine.ready
    finally:
        engine.stop()


def test_a_device_that_keeps_failing_is_not_ready(model):
    engine = make_engine(model, batch_wait_ms=0)
    worker = engine.workers[0]
    worker.run = lambda batch: (_ for _ in ()).throw(RuntimeError("device lost"))
    worker.probe = lambda: False

    async def encode():
        return await engine.encode(clips(1, 7), torch.tensor([8]))

    try:
        with pytest.raises(DeviceFailure, match="device lost") as failure:
            asyncio.run(encode())
        assert failure.value.http_status == 500 and not engine.ready
    finally:
        engine.stop()
