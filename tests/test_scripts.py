"""scripts/setup.sh installs once: run again with pyproject.toml and TORCH_SPEC unchanged, it
installs nothing (a second `scripts/start.sh` leaves alone the venv a running server uses).
Run in a scratch copy with a stand-in `python3` that records what it is asked to do."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A `python3` whose `-m venv .venv` makes a .venv/bin/python that logs its arguments.
FAKE_PYTHON3 = """#!/usr/bin/env bash
set -e
if [[ "$1 $2" == "-m venv" ]]; then
    mkdir -p "$3/bin"
    printf '#!/usr/bin/env bash\\necho "$*" >> "%s"\\n' "$LOG" > "$3/bin/python"
    chmod +x "$3/bin/python"
    echo "venv $3" >> "$LOG"
fi
"""


def run_setup(project: Path, log: Path, **env: str) -> list[str]:
    """Run the project's setup.sh; the commands it ran this time."""
    before = log.read_text().splitlines() if log.exists() else []
    environment = {key: value for key, value in os.environ.items() if key != "TORCH_SPEC"}
    environment.update(PATH=f"{project / 'fake-bin'}:{os.environ['PATH']}", LOG=str(log), **env)
    subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=environment, check=True, timeout=60)
    return log.read_text().splitlines()[len(before):]


def test_setup_installs_once_and_again_only_when_pyproject_or_torch_spec_change(tmp_path):
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", project / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    fake = project / "fake-bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON3)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "commands.log"

    first = run_setup(project, log)
    assert first[0] == "venv .venv" and any("install -q -e .[test]" in line for line in first), first
    assert run_setup(project, log) == []  # nothing changed: nothing installed, the venv untouched

    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# a change\n")
    assert any("install -q -e .[test]" in line for line in run_setup(project, log))
    assert run_setup(project, log) == []
    assert any("install -q -e .[test]" in line for line in run_setup(project, log, TORCH_SPEC="torch==2.13.0"))

    (project / ".venv" / ".coordtok-installed").unlink()  # an install that did not finish left no stamp
    assert any("install -q -e .[test]" in line for line in run_setup(project, log, TORCH_SPEC="torch==2.13.0"))
