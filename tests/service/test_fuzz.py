"""Schemathesis against the app's own OpenAPI spec: every operation, generated parameters and
bodies (videos, token files, job requests, job ids), through the real app with a tiny tokenizer
and generator. No answer may be a 5xx. Bounded and deterministic (derandomized): set
COORDTOK_FUZZ_EXAMPLES to explore more per operation (default 50)."""
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.python import asgi

from coordtok.service.app import create_app
from coordtok.service.settings import Settings
from tests.service.test_jobs import save_models

EXAMPLES = int(os.environ.get("COORDTOK_FUZZ_EXAMPLES", "50"))
# Every check runs. positive_data_acceptance expects 2xx for a request the schema allows; no schema
# can say which bytes are a video or a token file of this model, so for the upload routes their
# content refusals (413 too large, 415 not a video, 422 damaged) are accepted answers too; and a
# generate request can pass the schema and still be refused (422) by a limit the server's settings
# set (num_videos, steps) or a combination of fields (guidance above 1 without a class_label).
CONFIG = """
[[operations]]
include-path-regex = "^/v1/(encode|decode|preview)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "413", "415", "422"]

[[operations]]
include-path-regex = "^/v1/generate$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422"]
"""
ANSWERS: Counter = Counter()  # (operation, status) -> calls; printed at the end (pytest -s)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    tokenizer, generator = save_models(folder)
    app = create_app(Settings(
        model=str(tokenizer), generator=str(generator), jobs_dir=folder / "jobs", devices=["cpu"], batch_wait_ms=0,
        max_videos_per_job=2, max_generation_steps=60, max_queued_jobs=100_000, upload_dir=folder,
    ))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_str(CONFIG))
    yield schema
    asgi.shutdown_lifespans()  # the app's lifespan: engine, generation lane
    assert list(folder.glob("coordtok-*.upload")) == []  # every temporary upload was removed
    for (operation, status), calls in sorted(ANSWERS.items()):
        print(f"fuzz: {operation} {status} x{calls}")
    print(f"fuzz: {sum(ANSWERS.values())} calls")


def test_every_operation_answers_as_its_spec_says(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10  # every route of the API, not an empty spec

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def answers_as_the_spec_says(case):
            response = case.call()
            ANSWERS[f"{case.method} {case.operation.path}", response.status_code] += 1
            case.validate_response(response)  # every check schemathesis has

        answers_as_the_spec_says()
