"""service/errors.py: the one error -> status table and the one error body."""
import json

import pytest

from coordtok.formats.tokens import TokenError
from coordtok.formats.video import CorruptMedia, MediaTooLarge, TooManyFrames, UnsupportedMedia
from coordtok.service import jobs
from coordtok.service.engine import DeadlineExceeded, DeviceFailure, EngineError, NotReady, QueueFull
from coordtok.service.errors import BodyTimeout, BodyTooLarge, RequestError, error_response, refusal, status_of
from coordtok.service.uploads import UploadError


@pytest.mark.parametrize("error, status", [
    (UnsupportedMedia("audio only"), 415),
    (CorruptMedia("truncated"), 422),
    (MediaTooLarge("8192x8192"), 413),
    (TooManyFrames(900, 64), 413),  # a subclass takes its parent's entry
    (TokenError("NaN"), 422),
    (QueueFull("full"), 503),
    (NotReady("starting"), 503),
    (DeadlineExceeded("late"), 504),
    (EngineError("failed"), 500),
    (DeviceFailure("cuda:0 ran out of memory", out_of_memory=True), 503),
    (DeviceFailure("cuda:0 was lost", device_lost=True), 503),
    (DeviceFailure("the model failed"), 500),
    (jobs.JobNotFound("no such job"), 404),
    (jobs.JobConflict("running"), 409),
    (jobs.TooManyJobs("queue full"), 503),
    (jobs.GeneratorUnavailable("none loaded"), 503),
    (jobs.JobError("bad"), 422),
    (RequestError("too many clips", 413), 413),
    (RequestError("bad range"), 422),
    (BodyTooLarge("big"), 413),
    (BodyTimeout("slow"), 408),
    (UploadError("malformed multipart", 400), 400),
    (RuntimeError("a bug"), 500),
])
def test_every_error_type_has_its_status(error, status):
    assert status_of(error) == status


def test_the_error_body_names_type_and_message_and_a_503_says_when_to_retry():
    answer = refusal(QueueFull("too many requests in the system"))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert json.loads(answer.body) == {"error": {"type": "QueueFull", "message": "too many requests in the system"}}
    closing = refusal(BodyTooLarge("the body exceeds the limit"), {"Connection": "close"})
    assert closing.status_code == 413 and closing.headers["connection"] == "close" and "retry-after" not in closing.headers
    assert json.loads(error_response("HTTPError", "Not Found", 404).body)["error"] == {"type": "HTTPError", "message": "Not Found"}
