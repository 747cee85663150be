"""`coordtok generate`: videos from the SiT generator as a job, on a server (--url) or on the
server's app run in this process (its generation lane and engine; the job store in a temporary
folder)."""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx

from coordtok.service.commands.common import (add_command, add_model_options, add_server_options, model_setting, must,
                                              positive_int)

# GenerateRequest's fields -> the options of `coordtok generate` that set them.
_GENERATE_OPTIONS = {"num_videos": "-n/--num-videos", "steps": "--steps", "sampler": "--sampler", "seed": "--seed",
                     "guidance": "--guidance", "class_label": "--class-label", "format": "--format", "fps": "--fps"}


def add_to(commands) -> None:
    from coordtok.service.jobs.request import RESULT_TYPES

    generate = add_command(commands, "generate", "generate videos with the SiT generator (in this process, or on a server with --url)")
    generate.add_argument("-n", "--num-videos", type=int, default=1, help="videos to generate")
    generate.add_argument("-o", "--output", required=True, help="folder for video_000.mp4, ...")
    generate.add_argument("--steps", type=int, default=50, help="sampling steps")
    generate.add_argument("--sampler", choices=["euler", "heun", "euler-maruyama"], default="euler", help="the ODE/SDE sampler")
    generate.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    generate.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (needs --class-label)")
    generate.add_argument("--class-label", type=int, default=None, help="the class, for a class-conditional generator")
    generate.add_argument("--format", choices=list(RESULT_TYPES), default="mp4", help="what each result file holds")
    generate.add_argument("--fps", type=float, default=None, help="frame rate of the videos (default 25)")
    add_server_options(generate, "--url", "--server", runs="the models")
    add_model_options(generate, in_process_only=True)
    generate.add_argument("--generator", default=None, metavar="PATH", help="in-process only: the generator .safetensors (default: bundled)")
    generate.add_argument("--device", default=None, help="in-process only: cpu, cuda, cuda:1 ... (default: cuda if available)")
    generate.add_argument("--batch-size", type=positive_int, default=4, help="in-process only: videos sampled together")
    generate.set_defaults(run=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate videos as a job: on a server (--url), or on the server's app run in this process."""
    from coordtok.service.jobs import RESULT_TYPES

    out = Path(args.output)
    extension, _ = RESULT_TYPES[args.format]
    request = generate_request(args)  # every option checked before anything is made
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: not a folder")
    paths = [out / f"video_{k:03d}.{extension}" for k in range(args.num_videos)]
    seed = asyncio.run(_generate(args, request, paths))
    print(f"wrote {len(paths)} file(s) to {out} (seed {seed})")
    return 0


async def _generate(args: argparse.Namespace, request, paths: list[Path]) -> int:
    """Run the job on --url's server, or in this process on the app `coordtok serve` runs (its
    generation lane and engine; the job store in a temporary folder); its seed."""
    from coordtok.service.app import create_app
    from coordtok.service.client import AsyncClient

    if args.server:
        async with AsyncClient(args.server, api_key=args.api_key) as client:
            return await _run_job(client, request, paths, poll_s=0.5)
    with tempfile.TemporaryDirectory(prefix="coordtok-generate-") as jobs_dir:
        app = create_app(_generation_settings(args, request, Path(jobs_dir)))
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            if runtime.generator is None:
                raise ValueError(f"no generator: {runtime.generator_problem}")
            async with AsyncClient("http://in-process", transport=httpx.ASGITransport(app=app)) as client:
                return await _run_job(client, request, paths, poll_s=0.1)


def _generation_settings(args: argparse.Namespace, request, jobs_dir: Path):
    """The settings of the app that `coordtok generate` runs in this process: its models and
    device, and limits that fit this one job."""
    from coordtok.model.checkpoint import default_device
    from coordtok.service.settings import Settings

    model = model_setting(args)
    return Settings(**({"model": model} if model else {}), generator=args.generator or "", jobs_dir=jobs_dir,
                    devices=[args.device or str(default_device())], generation_batch_size=args.batch_size,
                    max_videos_per_job=request.num_videos, max_generation_steps=request.steps)


def generate_request(args: argparse.Namespace):
    """The job request of `coordtok generate`'s options; ValueError naming the option that is out
    of range and its limits."""
    import pydantic

    from coordtok.service import jobs

    try:
        return jobs.GenerateRequest(num_videos=args.num_videos, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                    guidance=args.guidance, class_label=args.class_label, format=args.format,
                                    **({"fps": args.fps} if args.fps else {}))
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        option = _GENERATE_OPTIONS.get(str(problem["loc"][0]), str(problem["loc"][0]))
        raise ValueError(f"{option} {must(problem)}, not {problem['input']}") from None


def _progress_line(job: dict) -> str:
    p = job["progress"]
    return f"{job['status']}: video {min(p['videos_done'] + 1, p['videos'])} of {p['videos']}, step {p['step']} of {p['steps']}"


class _ProgressPrinter:
    """One progress line on stderr: rewritten in place on a terminal, else printed when it changes."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        if sys.stderr.isatty():
            print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.last and sys.stderr.isatty():
            print(file=sys.stderr)


async def _run_job(client, request, paths: list[Path], poll_s: float) -> int:
    """Create the job, show its progress, and write its videos to `paths`; its seed. An interrupt
    cancels the job."""
    show = _ProgressPrinter()
    options = request.model_dump()
    job = await client.generate(fmt=options.pop("format"), **options)
    try:
        job = await client.wait(job["id"], poll_s=poll_s, on_progress=lambda j: show(f"job {j['id'][:8]} {_progress_line(j)}"))
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C: asyncio.run cancels the task
        await client.cancel(job["id"])
        show.done()
        print(f"cancelled job {job['id']}", file=sys.stderr)
        raise
    show.done()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error'] or 'no results'}")
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for k, path in enumerate(paths):
        path.write_bytes(await client.result(job["id"], k))
    return job["request"]["seed"]
