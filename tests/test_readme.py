"""Every code block of README.md, as written.

- Run: the Python block; `bash scripts/start.sh` (a server, with `--host 127.0.0.1 --port P`
  passed through as the README says arguments are, so that it does not take port 8000 of the
  machine); the `coordtok` commands, those against `http://localhost:8000` sent to that server; a
  command that names a file the user brings (the authors' checkpoint) runs on a stand-in of that
  name (the repository's tiny official checkpoint).
- Options checked: commands that need data, hours or GPUs this machine has not (training,
  torchrun, benchmarks that time themselves for minutes) must name only options their program's
  `--help` lists.
- Not run: `bash scripts/test.sh` is this suite (syntax-checked); `docker` needs an engine
  (`tests/deploy/` lints and runs the images' steps; the files named must exist).

A command of any other kind fails the test, so a new block gets a way to be checked.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.server_process import free_port, server_process

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OFFICIAL = ROOT / "tests" / "data" / "official" / "tiny"
BIN = Path(sys.executable).parent  # the venv's bin: coordtok, torchrun
README_URL = "http://localhost:8000"
TIMEOUT_S = 600


def blocks(language: str) -> list[str]:
    found = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
    assert {lang for lang, _ in found} <= {"bash", "python", ""}, {lang for lang, _ in found}
    return [code for lang, code in found if lang == language]


def commands() -> list[list[str]]:
    """Every command of the bash blocks: continuation lines joined, comments dropped."""
    lines = "\n".join(blocks("bash")).replace("\\\n", " ").splitlines()
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def kind(words: list[str]) -> str:
    if words[:2] == ["bash", "scripts/start.sh"]:
        return "server"
    if words[:2] == ["bash", "scripts/test.sh"]:
        return "suite"
    if words[0] == "docker":
        return "docker"
    if words[0] in ("coordtok", ".venv/bin/coordtok"):
        return "run"
    if words[0] in ("python", ".venv/bin/python", "torchrun"):
        return "options"
    return "unknown"


def test_every_readme_command_is_of_a_kind_this_test_checks():
    found = commands()
    assert [words for words in found if kind(words) == "unknown"] == []
    assert {kind(words) for words in found} == {"server", "suite", "docker", "run", "options"}
    assert len(blocks("python")) == 1


def run(command: list[str] | str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "COORDTOK_DEVICES": '["cpu"]', "COORDTOK_JOBS_DIR": str(cwd / "jobs")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_python_block_runs(tmp_path):
    (code,) = blocks("python")
    run([sys.executable, "-c", code], tmp_path)
    assert (tmp_path / "tokenizer.safetensors").is_file()


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The server `bash scripts/start.sh` starts, on a free loopback port: its URL."""
    folder = tmp_path_factory.mktemp("start")
    (start,) = [words for words in commands() if kind(words) == "server"]
    port = free_port()
    command = [*start, "--host", "127.0.0.1", "--port", str(port)]
    with server_process(folder / "server.log", {"COORDTOK_JOBS_DIR": str(folder / "jobs")}, command, port,
                        timeout_s=TIMEOUT_S) as (url, _):
        yield url


def stand_ins(words: list[str], folder: Path) -> None:
    """Files a command names that a user brings: the authors' checkpoint and its config, a folder of
    videos (the sample clip)."""
    if words[:2] == ["coordtok", "import-official"]:
        shutil.copy(OFFICIAL / "checkpoint.pth", folder / words[2])
        shutil.copy(OFFICIAL / "config.json", folder / words[words.index("--config") + 1])
    if words[:2] == ["coordtok", "encode-dataset"]:
        (folder / words[2] / "sample").mkdir(parents=True)
        shutil.copy(ROOT / "service" / "static" / "sample.avi", folder / words[2] / "sample")


def test_the_coordtok_commands_run_as_written(started, tmp_path):
    for words in [words for words in commands() if kind(words) == "run"]:
        stand_ins(words, tmp_path)
        argv = [started if word == README_URL else word for word in words]
        result = run(argv, ROOT if argv[0].startswith(".venv/") else tmp_path)
        if "roundtrip" in argv:
            assert "trilinear baseline" in result.stdout and " dB" in result.stdout, result.stdout
        if "-o" in argv:
            out = tmp_path / argv[argv.index("-o") + 1]
            assert out.exists() and (out.is_file() or any(out.iterdir())), argv
    assert (tmp_path / "out" / "video_001.webm").is_file()  # the job API's results


def launched(words: list[str]) -> list[str]:
    """The command a torchrun command starts in each process: `python -m MODULE ...`, or with
    --no-python the program after it (`coordtok encode-dataset ...`)."""
    if words[0] != "torchrun":
        return words
    if "--no-python" in words:
        return words[words.index("--no-python") + 1:]
    return ["python", *words[words.index("-m"):]]


def program_help(words: list[str]) -> str:
    """`--help` of the program a command (after `launched`) runs: a module, a script or a coordtok command."""
    if words[0] == "coordtok":
        return run([str(BIN / "coordtok"), words[1], "--help"], ROOT).stdout
    program = words[:3] if words[1] == "-m" else words[:2]
    return run([sys.executable, *program[1:], "--help"], ROOT).stdout


def test_the_commands_that_need_data_or_gpus_name_only_options_their_programs_have():
    for words in [launched(words) for words in commands() if kind(words) == "options"]:
        text = program_help(words)
        module_args = words[3:] if words[1] == "-m" else words[2:]
        options = {word.split("=")[0] for word in module_args if word.startswith("--")}
        assert all(re.search(rf"(^|[\s\[,]){re.escape(o)}\b", text) for o in options), (words, options)


def test_the_commands_not_run_here_name_what_exists():
    for words in commands():
        if kind(words) == "suite":
            subprocess.run(["bash", "-n", words[1]], cwd=ROOT, check=True)
        elif kind(words) == "docker" and "-f" in words:
            assert (ROOT / words[words.index("-f") + 1]).is_file(), words
