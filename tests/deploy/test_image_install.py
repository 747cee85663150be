"""The images' install steps and entry point, run here as the Dockerfiles run them (this machine has
no Docker engine): the files the Dockerfile copies are copied to a folder, its RUN steps (the same
docker/install.sh in both images) run in a fresh virtual environment, the project is installed
from those files and not editable (as the `coordtok` package only: `import model` fails, `import
coordtok; coordtok.load_model()` works), then `coordtok --help` works and docker/entrypoint.sh serves,
with the models of a mounted folder or else the bundled ones, and answers its own health check.

The environment borrows from this interpreter the distributions it has at the pinned versions
(torch above all, so that it is not downloaded again) and downloads the others; the step that
takes torch from the PyTorch index (TORCH_INDEX) is the one step skipped."""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx

from tests.deploy.deployment import DOCKERFILES, ROOT, canonical, instructions, pins
from tests.service.server_process import free_port, running_server
from tests.service.test_jobs import save_models

SOURCE = "/src"  # the Dockerfiles' WORKDIR while installing


def install_steps(dockerfile: Path) -> list[tuple[str, str]]:
    """The COPY and RUN steps from the first copy into /src to the project's install."""
    steps, started = [], False
    for instruction, arguments in instructions(dockerfile):
        started = started or (instruction == "WORKDIR" and arguments == SOURCE)
        if started and instruction in ("COPY", "RUN"):
            steps.append((instruction, arguments))
            if instruction == "RUN" and "install.sh project" in arguments:
                break
    return steps


def test_both_images_install_and_start_the_same_way():
    gpu, cpu = (install_steps(path) for path in DOCKERFILES)
    assert gpu == cpu and [a for i, a in gpu if i == "RUN"] == [
        'TORCH_INDEX="${TORCH_INDEX}" sh docker/install.sh deps', "sh docker/install.sh project /src"]
    for path in DOCKERFILES:
        steps = dict(instructions(path))  # the last of each
        assert steps["USER"].isdigit() and steps["USER"] != "0"
        assert steps["ENTRYPOINT"] == '["coordtok-entrypoint"]'
        assert steps["HEALTHCHECK"].endswith('CMD ["coordtok-entrypoint", "healthcheck"]')
        assert steps["VOLUME"] == '["/data"]' and "COORDTOK_JOBS_DIR=/data/jobs" in steps["ENV"]
        assert "COORDTOK_MODELS_DIR=/models" in steps["ENV"]
    gpu_file = DOCKERFILES[0].read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", gpu_file, re.MULTILINE)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", gpu_file, re.MULTILINE)


def copy_sources(dockerfile: Path, source: Path, bin_dir: Path) -> list[str]:
    """Do the Dockerfile's COPY steps into `source` (its /src); return its RUN steps."""
    runs = []
    for instruction, arguments in install_steps(dockerfile):
        if instruction == "RUN":
            runs.append(arguments)
            continue
        *paths, destination = [a for a in arguments.split() if not a.startswith("--")]
        target = source / destination
        for path in paths:
            origin = ROOT / path
            into = target / origin.name if destination.endswith("/") or len(paths) > 1 else target
            if origin.is_dir():
                shutil.copytree(origin, into, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)
    entrypoint = next(a for i, a in instructions(dockerfile) if i == "COPY" and "entrypoint.sh" in a).split()
    assert entrypoint[0] == "--chmod=755"
    installed = bin_dir / Path(entrypoint[-1]).name
    shutil.copy(ROOT / entrypoint[-2], installed)
    installed.chmod(0o755)
    return runs


def fresh_venv(folder: Path) -> Path:
    """A new virtual environment, without pip, that borrows from this interpreter only pip and the
    distributions at the versions docker/requirements.txt pins (torch above all: no download),
    linked into a folder of their own; the install steps download the others."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    borrowed = folder / "borrowed"
    borrowed.mkdir()
    wanted = {**pins(), "pip": None}
    outer = list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))
    for dist in importlib.metadata.distributions(path=outer):
        name = canonical(dist.metadata["Name"])
        if name not in wanted or wanted[name] not in (None, dist.version.split("+")[0]) or not dist.files:
            continue
        base = Path(dist.locate_file(""))
        for top in {file.parts[0] for file in dist.files} - {"..", "__pycache__"}:
            if (base / top).exists() and not top.endswith(".pth") and not (borrowed / top).exists():
                (borrowed / top).symlink_to(base / top)
    (Path(site) / "_borrowed.pth").write_text(f"{borrowed}\n")
    return python


def test_the_image_install_steps_and_entrypoint_serve(tmp_path):
    venv = tmp_path / "venv"
    try:
        install_and_serve(tmp_path, venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # what it downloaded (triton: hundreds of MB)


def install_and_serve(tmp_path: Path, venv: Path) -> None:
    python, source, models = fresh_venv(venv), tmp_path / "src", tmp_path / "models"
    bin_dir = venv / "bin"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TORCH_INDEX": "", "PYTHONPATH": "",
           "VIRTUAL_ENV": str(venv)}
    for step in copy_sources(DOCKERFILES[1], source, bin_dir):
        done = subprocess.run(["sh", "-c", step.replace(SOURCE, str(source))], cwd=source, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{step}:\n{done.stdout}\n{done.stderr}"

    where = subprocess.run([python, "-c", "import coordtok; print(coordtok.__file__); print(coordtok.load_model().config.frames)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    assert Path(where[0]).is_relative_to(site) and where[1] == "128", where  # installed, not the checkout
    package = site / "coordtok"
    assert (package / "service" / "static" / "index.html").is_file() and (package / "model" / "weights" / "default.safetensors").is_file()
    for bare in ("model", "kernels", "formats", "trainer", "service"):  # only the coordtok namespace is installed
        imported = subprocess.run([python, "-c", f"import {bare}"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert imported.returncode != 0 and f"No module named '{bare}'" in imported.stderr, (bare, imported.stderr)
    helped = subprocess.run([bin_dir / "coordtok", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "serve" in helped.stdout

    models.mkdir()
    tokenizer, generator = save_models(tmp_path)
    shutil.copy(tokenizer, models / "tokenizer.safetensors")
    shutil.copy(generator, models / "generator.safetensors")
    entrypoint = [str(bin_dir / "coordtok-entrypoint")]
    port = free_port()
    serving = {**env, "COORDTOK_HOST": "127.0.0.1", "COORDTOK_PORT": str(port), "COORDTOK_MODELS_DIR": str(models),
               "COORDTOK_JOBS_DIR": str(tmp_path / "jobs"), "COORDTOK_BATCH_MAX_FRAMES": "128"}
    with running_server(tmp_path / "server.log", serving, command=entrypoint, port=port, cwd=tmp_path) as url:
        info = httpx.get(f"{url}/v1/models").json()
        assert info["models"][0]["id"].startswith("tokenizer@") and info["generator"]["id"].startswith("generator@")
        assert "CoordTok playground" in httpx.get(url).text
        health = subprocess.run([*entrypoint, "healthcheck"], env=serving, capture_output=True, text=True)
        assert health.returncode == 0, health.stderr
    down = subprocess.run([*entrypoint, "healthcheck"], env={**serving, "COORDTOK_PORT": str(free_port())},
                          capture_output=True, text=True)
    assert down.returncode != 0 and "not ready" in down.stderr

    empty = tmp_path / "no-models"
    empty.mkdir()
    bundled = {**serving, "COORDTOK_MODELS_DIR": str(empty), "COORDTOK_PORT": str(port := free_port())}
    with running_server(tmp_path / "bundled.log", bundled, command=entrypoint, port=port, cwd=tmp_path) as url:
        assert httpx.get(f"{url}/v1/models").json()["models"][0]["id"].startswith("default@")

