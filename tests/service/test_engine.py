"""The engine: batching across requests, equal results, back-pressure, deadlines, failures, and
(with several CPU replicas standing in for GPUs) routing, replicas taken out of service, requests
split into batches, warm-up, and the worker threads' device."""
import asyncio
import copy
import threading
import time

import pytest
import torch

from coordtok.model import CoordTok, CoordTokConfig
from coordtok.model import Triplane
from coordtok.service.engine import worker as worker_module
from coordtok.service.engine import DeadlineExceeded, DeviceFailure, Engine, NotReady, QueueFull
from coordtok.service.errors import status_of

CONFIG = CoordTokConfig(
    frames=8, height=16, width=16, enc_dim=32, enc_heads=2, enc_patch_t=4, enc_patch_xy=8, enc_vit_layers=1,
    enc_cross_layers=1, latent_res_xy=4, latent_res_t=8, latent_channels=4, latent_patch_xy=2, latent_patch_t=4,
    dec_dim=32, dec_heads=2, dec_layers=1, dec_patch_xy=4, decode_slice_frames=4,
)


@pytest.fixture(scope="module")
def model() -> CoordTok:
    torch.manual_seed(0)
    return CoordTok(CONFIG).eval()


def make_engine(model, batches=None, replicas=1, **settings) -> Engine:
    """An engine over `replicas` CPU replicas (cpu:0, cpu:1, ... each its own copy of the model)."""
    values = dict(batch_max_frames=64, batch_wait_ms=100, max_queue=8, request_timeout_s=30)
    values.update(settings)
    models = {"cpu": model} if replicas == 1 else {f"cpu:{i}": copy.deepcopy(model) for i in range(replicas)}
    engine = Engine(models, on_batch=None if batches is None else batches.append, **values)
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
    assert isinstance(result, DeadlineExceeded) and status_of(result) == 504


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
        assert status_of(failure.value) == 503
        assert engine.ready  # the probe found the device usable
        worker.run = real_run
        assert asyncio.run(encode()).batch_size == 1
        assert engine.ready
    finally:
        engine.stop()


def fail_with(message: str):
    return lambda batch: (_ for _ in ()).throw(RuntimeError(message))


def test_a_device_whose_probe_keeps_failing_is_taken_out_of_service(model, monkeypatch):
    monkeypatch.setattr(worker_module, "PROBE_PAUSE_S", 0.01)
    engine = make_engine(model, batch_wait_ms=0)
    worker = engine.workers[0]
    worker.run = fail_with("the model broke")
    probes = []
    worker.probe = lambda: probes.append(1) and False

    async def encode():
        return await engine.encode(clips(1, 7), torch.tensor([8]))

    try:
        with pytest.raises(DeviceFailure, match="the model broke") as failure:
            asyncio.run(encode())
        assert status_of(failure.value) == 500 and len(probes) == worker_module.PROBE_ATTEMPTS
        assert not engine.ready and not engine.alive and engine.states() == {"cpu": "out of service"}
        with pytest.raises(NotReady, match="no device is in service"):
            asyncio.run(encode())
    finally:
        engine.stop()


def test_a_sticky_device_error_takes_the_replica_out_without_probing(model):
    engine = make_engine(model, batch_wait_ms=0)
    worker = engine.workers[0]
    worker.run = fail_with("CUDA error: an illegal memory access was encountered")
    worker.probe = lambda: pytest.fail("a lost device is not probed")
    try:
        with pytest.raises(DeviceFailure, match="taken out of service") as failure:
            asyncio.run(engine.encode(clips(1, 7), torch.tensor([8])))
        assert status_of(failure.value) == 503 and failure.value.device_lost and not engine.alive
    finally:
        engine.stop()


def record_devices(engine: Engine) -> list[str]:
    """The device of every batch run, in order."""
    ran = []
    for worker in engine.workers:
        def recording(batch, worker=worker, real=worker.run):
            ran.append(str(worker.device))
            return real(batch)
        worker.run = recording
    return ran


def test_two_replicas_one_failing_the_healthy_one_takes_its_work(model):
    """The issue's simulation: a replica that fails fast (here: a sticky device error after 0.2 s)
    fails only the batch it held; the work queued behind it and every later request run on the
    healthy replica, and the server stays ready and alive."""
    engine = make_engine(model, replicas=2, batch_max_frames=8, batch_wait_ms=0)
    healthy, failing = engine.workers
    ran = record_devices(engine)
    failing.run = lambda batch: (ran.append("cpu:1"), time.sleep(0.2), fail_with("CUDA error: unspecified launch failure")(batch))

    async def encode_all(n):
        return await asyncio.gather(*(engine.encode(clips(1, k), torch.tensor([8])) for k in range(n)),
                                    return_exceptions=True)

    try:
        first = asyncio.run(encode_all(8))
        later = asyncio.run(encode_all(4))
        states, ready, alive = engine.states(), engine.ready, engine.alive
    finally:
        engine.stop()
    failures = [r for r in first if isinstance(r, Exception)]
    assert len(failures) == 1 and isinstance(failures[0], DeviceFailure) and status_of(failures[0]) == 503
    assert all(isinstance(r, Triplane) for r in later)
    assert ran.count("cpu:1") == 1 and ran.count("cpu:0") == 11
    assert states == {"cpu:0": "serving", "cpu:1": "out of service"} and ready and alive
    with torch.inference_mode():
        for k, result in enumerate(later):
            torch.testing.assert_close(result.xy, model.encode(clips(1, k).float() / 127.5 - 1).xy, rtol=1e-5, atol=1e-5)


def test_routing_counts_running_work_not_only_queued(model):
    """Replica 0 is busy with a slow batch (nothing queued): the next request goes to replica 1."""
    engine = make_engine(model, replicas=2, batch_wait_ms=0)
    slow = engine.workers[0].run
    started = threading.Event()
    engine.workers[0].run = lambda batch: (started.set(), time.sleep(0.5), slow(batch))[2]
    ran = record_devices(engine)

    async def run():
        first = asyncio.ensure_future(engine.encode(clips(1, 1), torch.tensor([8])))
        while not started.is_set():
            await asyncio.sleep(0.01)
        assert engine.workers[0].load == 8 and engine.workers[0].pending_cost == 0
        second = await engine.encode(clips(1, 2), torch.tensor([8]))
        return await first, second

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert ran == ["cpu:0", "cpu:1"]


def test_requests_larger_than_a_batch_are_split_and_put_back_together(model):
    batches = []
    engine = make_engine(model, batches, replicas=2, batch_max_frames=16, batch_wait_ms=0)
    video = clips(5, 8)
    n_frames = torch.tensor([8, 8, 8, 8, 3])
    with torch.inference_mode():
        expected = model.encode(video.float() / 127.5 - 1, n_frames)

    async def run():
        triplane = await engine.encode(video, n_frames)
        return triplane, await engine.decode(triplane, (1, 6)), await engine.decode(triplane, (4, 6))

    try:
        triplane, decoded, short = asyncio.run(run())
    finally:
        engine.stop()
    torch.testing.assert_close(triplane.xy, expected.xy, rtol=1e-5, atol=1e-5)
    assert decoded.shape == (5, 5, 16, 16, 3) and short.shape == (5, 2, 16, 16, 3)
    with torch.inference_mode():
        full = model.decode_video(triplane)
    assert torch.equal(decoded, ((full[:, 1:6].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    # Encode: 2 + 2 + 1 clips of 8 frames. Decode (1, 6): both 4-frame slices, 8 frames a clip,
    # 2 clips a batch; (4, 6): one slice, 4 frames a clip, 4 clips a batch.
    assert all(b.frames <= 16 for b in batches)
    assert sorted(b.frames for b in batches if b.kind == "encode") == [8, 16, 16]
    assert sorted(b.frames for b in batches if b.kind == "decode") == [4, 8, 16, 16, 16]
    assert {b.device for b in batches} == {"cpu:0", "cpu:1"}


def test_warm_up_runs_the_largest_batches_in_the_serving_dtype(model):
    engine = Engine({"cpu": copy.deepcopy(model)}, batch_max_frames=24, batch_wait_ms=0, max_queue=1, request_timeout_s=5)
    worker = engine.workers[0]
    shapes = []
    real_encode, real_decode = worker.model.encode, worker.model.decode_video
    worker.model.encode = lambda video, n: (shapes.append(("encode", tuple(video.shape), video.dtype)), real_encode(video, n))[1]
    worker.model.decode_video = lambda t, frames: (shapes.append(("decode", t.batch_size, frames)), real_decode(t, frames=frames))[1]
    (report,) = engine.warm_up()
    assert shapes == [("encode", (3, 8, 16, 16, 3), torch.float32), ("decode", 6, (0, 4))]
    assert (report.device, report.dtype, report.encode_clips, report.decode_clips, report.decode_frames) == ("cpu", "float32", 3, 6, 4)
    assert report.peak_memory_bytes is None  # no device memory to measure on the CPU


def test_each_worker_thread_makes_its_cuda_device_current_before_running(model, monkeypatch):
    """Paper GPUs: a replica named cuda:1 (its model stays on the CPU; batches are faked) must call
    torch.cuda.set_device(cuda:1) on its own thread before its first batch."""
    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: events.append(("set_device", torch.device(device), threading.current_thread().name)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    engine = Engine({"cuda:1": model}, batch_max_frames=8, batch_wait_ms=0, max_queue=2, request_timeout_s=5)
    worker = engine.workers[0]
    assert worker.autocast  # bf16 is the serving dtype on such a GPU
    with torch.inference_mode():
        result = model.encode(clips(1, 0).float() / 127.5 - 1)
    worker.run = lambda batch: (events.append(("run", threading.current_thread().name)), [result])[1]
    engine.start()
    try:
        asyncio.run(engine.encode(clips(1, 0), torch.tensor([8])))
    finally:
        engine.stop()
    assert events == [("set_device", torch.device("cuda:1"), "coordtok-cuda:1"), ("run", "coordtok-cuda:1")]


def test_a_compiled_decoder_gives_the_same_frames(model):
    engine = Engine({"cpu": copy.deepcopy(model)}, batch_max_frames=16, batch_wait_ms=0, max_queue=2,
                    request_timeout_s=600, compile_decoder=True)
    with torch.inference_mode():
        triplane = model.encode(clips(2, 9).float() / 127.5 - 1)
        expected = ((model.decode_video(triplane, frames=(0, 8)).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    engine.warm_up()
    engine.start()
    try:
        got = asyncio.run(engine.decode(triplane, (0, 8)))
    finally:
        engine.stop()
    assert (got.int() - expected.int()).abs().max() <= 1
