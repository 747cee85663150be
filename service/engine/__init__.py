"""The inference engine: one model replica per device, dynamic batching, health-aware routing,
back-pressure.

Routes hand work to `Engine.encode` / `Engine.decode` and await the result. A request of more than
`batch_max_frames` frames of work is cut into pieces of whole clips that fit (one clip at least,
`work.py`), which may run on different replicas and are put back together for the answer. Each
piece goes to the replica with the fewest frames of work queued plus running, among those in
service whose last probe passed (`engine.py`). Each replica's worker thread takes batches from its
queue (`batching.py`: the oldest piece, then pieces that share its forward pass, until the batch
holds `batch_max_frames` frames of work or `batch_wait_ms` have passed) and runs them on its device
in the serving dtype (`worker.py`).

Failures: a failed batch fails its requests (503 when the device ran out of memory or was lost, 500
otherwise), then the worker probes its device. A non-recoverable device error or a probe that keeps
failing takes the replica out of service for good: its queued work moves to the other replicas. The
requests of the failed batch are not retried elsewhere: a batch that broke one device could break
the next. `ready` holds while some replica serves; `alive` turns false when none is left, so that
/healthz fails and the process is restarted.

Back-pressure: `Engine.admit()` reserves a place before the request's work starts; past `max_queue`
requests in the system it raises `QueueFull` (503). The generation lane's decodes are admitted the
same way. Work whose deadline passes while it waits is dropped (`DeadlineExceeded`, 504); work whose
request went away (a cancelled future) is skipped.

`Engine.warm_up()` runs every replica once on the largest encode and decode batches the settings
allow, in its serving dtype, so that compilation and running out of memory happen at start-up, and
reports the peak device memory it saw.
"""
from coordtok.service.engine.engine import Engine
from coordtok.service.engine.errors import DeadlineExceeded, DeviceFailure, EngineError, NotReady, QueueFull
from coordtok.service.engine.work import DecodeWork, EncodeWork, Work, decode_cost
from coordtok.service.engine.worker import BatchStats, DeviceWorker, WarmUp, upload

__all__ = [
    "BatchStats", "DeadlineExceeded", "DecodeWork", "DeviceFailure", "DeviceWorker", "EncodeWork", "Engine",
    "EngineError", "NotReady", "QueueFull", "WarmUp", "Work", "decode_cost", "upload",
]
