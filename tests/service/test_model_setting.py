"""The model setting: random weights only when asked for (`preset:NAME`), said in the log and in
/v1/models, with no generator beside them; a bare preset name is refused; unknown COORDTOK_*
variables are warned about at start-up."""
import logging

import pytest
from fastapi.testclient import TestClient

from coordtok.service.app import create_app
from coordtok.service.runtime import StartupError
from coordtok.service.settings import Settings, unknown_variables


def test_random_weights_are_said_and_leave_the_bundled_generator_unloaded(tmp_path, caplog):
    # The bundled generator fits coordtok-tiny's triplane shapes, but was made for other weights.
    settings = Settings(model="preset:coordtok-tiny", generator="", devices=["cpu"], batch_max_frames=1, jobs_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="coordtok.service"), TestClient(create_app(settings)) as client:
        info = client.get("/v1/models").json()
        refused = client.post("/v1/generate", json={"steps": 1})
    assert info["models"][0]["id"] == "coordtok-tiny@random" and "random weights" in info["models"][0]["warning"]
    assert info["generator"] is None
    assert refused.status_code == 503 and "random weights" in refused.json()["error"]["message"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("random weights (preset:coordtok-tiny)" in message for message in warnings), warnings


def test_trained_weights_have_no_warning(models, tmp_path):
    tokenizer, generator = models
    settings = Settings(model=str(tokenizer), generator=str(generator), devices=["cpu"], jobs_dir=tmp_path)
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/models").json()
    assert info["models"][0]["warning"] is None and info["generator"] is not None


@pytest.mark.parametrize("spec, says", [("coordtok-tiny", "is a preset name, not a weights file"),
                                        ("preset:coordtok-huge", "no preset 'coordtok-huge'")])
def test_a_bare_or_unknown_preset_does_not_start(spec, says, tmp_path):
    app = create_app(Settings(model=spec, devices=["cpu"], jobs_dir=tmp_path))
    with pytest.raises(StartupError), TestClient(app):
        pass
    assert says in app.state.startup_error


def test_unknown_coordtok_variables_are_warned_about_at_start(models, tmp_path, monkeypatch, caplog):
    assert unknown_variables({"COORDTOK_MAXQUEUE": "5", "COORDTOK_MAX_QUEUE": "5", "COORDTOK_PORT": "1", "HOME": "/"}) == [
        "COORDTOK_MAXQUEUE is not a CoordTok setting and is ignored; did you mean COORDTOK_MAX_QUEUE?"]
    assert unknown_variables({"coordtok_model": "x", "COORDTOK_ZZZ": "1"}) == ["COORDTOK_ZZZ is not a CoordTok setting and is ignored"]
    monkeypatch.setenv("COORDTOK_MAXQUEUE", "5")
    tokenizer, _ = models
    with caplog.at_level(logging.WARNING, logger="coordtok.service"):
        with TestClient(create_app(Settings(model=str(tokenizer), generator="none", devices=["cpu"], jobs_dir=tmp_path))):
            pass
    assert any("did you mean COORDTOK_MAX_QUEUE?" in r.getMessage() for r in caplog.records)
    assert not any("generation is off" in r.getMessage() for r in caplog.records)  # "none" is no mistake: info level
