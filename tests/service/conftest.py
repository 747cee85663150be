"""Fixtures shared by the service tests."""
import pytest

from tests.service.test_jobs import save_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(tokenizer, generator) files: a tiny tokenizer and a tiny random SiT over its triplanes."""
    return save_models(tmp_path_factory.mktemp("models"))
