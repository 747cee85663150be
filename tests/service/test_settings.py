"""Settings come from arguments, then COORDTOK_ variables, then the settings file."""
import json

import pytest
from pydantic import ValidationError

from coordtok.service.settings import Settings


def test_defaults_are_sane_and_bounded():
    s = Settings()
    assert s.api_keys == [] and s.max_queue >= 1 and s.media_limits().max_frames == s.max_frames


def test_environment_overrides_the_file_and_arguments_override_both(tmp_path, monkeypatch):
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"max_queue": 7, "batch_wait_ms": 3, "devices": ["cpu"]}))
    monkeypatch.setenv("COORDTOK_SETTINGS_FILE", str(file))
    monkeypatch.setenv("COORDTOK_MAX_QUEUE", "9")
    s = Settings()
    assert (s.max_queue, s.batch_wait_ms, s.devices) == (9, 3, ["cpu"])
    assert Settings(max_queue=2).max_queue == 2


def test_dotenv_settings_file_and_secret_keys(tmp_path, monkeypatch):
    file = tmp_path / "coordtok.env"
    file.write_text('COORDTOK_API_KEYS=["k1", "k2"]\nCOORDTOK_LOG_FORMAT=text\n')
    monkeypatch.setenv("COORDTOK_SETTINGS_FILE", str(file))
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"] and s.log_format == "text"
    assert "k1" not in repr(s)


def test_bad_values_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("COORDTOK_MAX_QUEUE", "0")
    with pytest.raises(ValidationError, match="max_queue"):
        Settings()
    monkeypatch.delenv("COORDTOK_MAX_QUEUE")
    monkeypatch.setenv("COORDTOK_SETTINGS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Settings()
