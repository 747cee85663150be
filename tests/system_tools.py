"""Tools outside Python that some tests need (`.ci/run` installs them). Where one is missing, the
test is skipped on a developer's machine and fails in CI (`.ci/run` sets CI=true), so CI never
skips it silently."""
import os

import pytest


def require(found: object, what: str, install: str) -> None:
    """Go on when `found` is truthy; else skip the test, or fail it in CI."""
    if found:
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        raise AssertionError(f"CI needs {what}: {install}")
    pytest.skip(f"no {what} ({install})")
