"""The `coordtok` command."""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

KEEP_ALIVE_S = 75
# `coordtok roundtrip`'s default clip: OpenCV's samples/data/tree.avi (Cinepak, 320x240, 15 fps,
# 68 frames though its header says 444; Apache-2.0), byte for byte as Debian's opencv-doc ships
# it. The bundled model's card holds it out of training.
SAMPLE_CLIP = Path(__file__).with_name("static") / "sample.avi"


def model_setting(args: argparse.Namespace) -> str:
    """The model setting that --model and --random-weights name: '' (the bundled weights), a
    .safetensors path, or `preset:NAME` (random weights, asked for explicitly)."""
    from coordtok.model import PRESETS
    from coordtok.service.app import RANDOM_PREFIX

    if getattr(args, "random_weights", False):
        if args.model not in PRESETS:
            raise ValueError(f"--random-weights needs --model PRESET, one of {', '.join(sorted(PRESETS))}")
        return RANDOM_PREFIX + args.model
    return args.model or ""


def cmd_roundtrip(args: argparse.Namespace) -> int:
    """Score the model on a real clip against the trilinear baseline, as its model card does."""
    from coordtok.model.checkpoint import default_device
    from coordtok.service.app import load_served_model, model_identity, random_weights_warning
    from coordtok.trainer.evaluate import evaluate

    spec = model_setting(args)
    video = Path(args.video)
    if not video.is_file():
        raise FileNotFoundError(f"no video at {video}")
    if warning := random_weights_warning(spec):
        print(f"coordtok: warning: {warning}", file=sys.stderr)
    device = args.device or str(default_device())
    model = load_served_model(spec, device)
    started = time.perf_counter()
    result = evaluate(model, [video], max_clips=args.clips)
    seconds = time.perf_counter() - started
    if not result["clips"]:
        raise ValueError(f"{video}: {result['skipped'][0]['error'] if result['skipped'] else 'no frames'}")
    c = model.config
    report = {
        "model": model_identity(spec)[0], "device": device, "video": str(video),
        "clips": len(result["clips"]), "frames_scored": sum(row["n_frames"] for row in result["clips"]),
        "clip": [c.frames, c.height, c.width], "tokens": c.tokens, "floats_per_clip": result["budget_floats"],
        "coordtok": {"psnr_db": round(result["mean"]["coordtok"]["psnr"], 2), "ssim": round(result["mean"]["coordtok"]["ssim"], 3)},
        "trilinear_baseline": {"psnr_db": round(result["mean"]["baseline"]["psnr"], 2),
                               "ssim": round(result["mean"]["baseline"]["ssim"], 3), "grid": result["baseline_grid"]},
        "seconds": round(seconds, 2),
    }
    print(json.dumps(report, indent=2) if args.json else roundtrip_text(report))
    return 0


def roundtrip_text(report: dict) -> str:
    """The roundtrip report for a person: the clip, then CoordTok's scores beside the baseline's."""
    frames, height, width = report["clip"]
    model, base = report["coordtok"], report["trilinear_baseline"]
    grid = "x".join(str(n) for n in base["grid"])
    return "\n".join([
        f"{Path(report['video']).name}: {report['frames_scored']} frames in {report['clips']} clip(s) of {frames} frames "
        f"at {width}x{height}, {report['tokens']:,} tokens ({report['floats_per_clip']:,} floats) per clip",
        f"  {'':<28}{'PSNR':>9}{'SSIM':>8}",
        f"  {report['model']:<28}{model['psnr_db']:>6.2f} dB{model['ssim']:>8.3f}",
        f"  {'trilinear baseline':<28}{base['psnr_db']:>6.2f} dB{base['ssim']:>8.3f}   (the same floats: a {grid} grid per colour)",
        f"  encoded, decoded and scored in {report['seconds']:.1f} s on {report['device']}",
    ])


def cmd_import_official(args: argparse.Namespace) -> int:
    from coordtok.model import load_official, save_model

    model = load_official(args.checkpoint, args.config, device="cpu")
    save_model(model, args.output, metadata={"source": Path(args.checkpoint).name})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from coordtok.service.app import create_app
    from coordtok.service.logs import configure_logging
    from coordtok.service.protocol import header_timeout_protocol
    from coordtok.service.settings import Settings

    model = model_setting(args)
    settings = Settings(**({"model": model} if model else {}), **({"generator": args.generator} if args.generator else {}))
    listener = listening_socket(args.host, args.port)  # before the models load: a busy port fails at once
    configure_logging(settings.log_format, logging.getLevelNamesMapping()[args.log_level.upper()])
    app = create_app(settings)
    logging.getLogger("uvicorn.error").addFilter(StartupFailureAtDebug(app))
    # Idle keep-alive connections stay open longer than clients and proxies keep theirs (httpx 5 s,
    # nginx 60 s): at uvicorn's default of 5 s a request sent as the server closes the connection
    # is lost (seen under load as connection resets the server never logged).
    # Headers must arrive within COORDTOK_HEADER_TIMEOUT_S (service/protocol.py).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S, http=header_timeout_protocol(settings.header_timeout_s))
    try:
        DrainingServer(config, app, settings.drain_timeout_s).run(sockets=[listener])
    except SystemExit:  # uvicorn's exit when start-up failed (logged): say why in one line
        problem = getattr(app.state, "startup_error", None)
        if problem is None:
            raise
        print(f"coordtok: error: {problem}", file=sys.stderr)
        return 2
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), for uvicorn to listen on; ValueError saying why when
    the address cannot be had (a port in use, a host that is not this machine's)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use (another server?): stop it, or pass another --port") from None
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    except (OverflowError, socket.gaierror) as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error}") from None
    return sock


class StartupFailureAtDebug(logging.Filter):
    """uvicorn logs a failed start-up as errors with the whole traceback; once the app has recorded
    why it cannot start (`app.state.startup_error`, which `coordtok serve` prints as one line),
    those records go out at debug level (`--log-level debug` shows them)."""

    def __init__(self, app) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or getattr(self.app.state, "startup_error", None) is None:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT stops readiness and new work (503) at once,
    then exits when the requests in flight are done or `drain_timeout_s` has passed."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_timeout_s = app, drain_timeout_s

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # uvicorn says where it listens only for the sockets it opened itself
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info(f"Uvicorn running on http://{shown}:{port} (Press CTRL+C to quit)")

    def handle_exit(self, sig, frame) -> None:
        engine = getattr(self.app.state, "engine", None)
        if engine is None or not engine.accepting:  # not started, or a second signal: exit now
            return super().handle_exit(sig, frame)
        engine.stopping.set()  # the one stop signal: no new work, the generation lane requeues its job

        def drain() -> None:
            deadline = time.monotonic() + self.drain_timeout_s
            while engine.in_system and time.monotonic() < deadline:
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="coordtok-drain", daemon=True).start()


async def _with_client(args: argparse.Namespace, action):
    """Run `action(client)` against --server, or against the app in this process."""
    from coordtok.service.client import AsyncClient

    if args.server:
        async with AsyncClient(args.server, api_key=args.api_key) as client:
            return await action(client)
    from coordtok.service.app import create_app
    from coordtok.service.settings import Settings

    model = model_setting(args)
    app = create_app(Settings(generator="none", **({"model": model} if model else {})))
    async with app.router.lifespan_context(app):
        async with AsyncClient("http://in-process", transport=httpx.ASGITransport(app=app)) as client:
            return await action(client)


def _token_format_of(path: str) -> str:
    from coordtok.formats.tokens import FORMATS

    suffix = Path(path).suffix.lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"{path}: token files end in {_either(FORMATS)}")
    return suffix


def _either(formats) -> str:
    """Format names as file endings: '.a, .b or .c'."""
    *others, last = [f".{name}" for name in formats]
    return f"{', '.join(others)} or {last}"


def cmd_encode(args: argparse.Namespace) -> int:
    from coordtok.formats import tokens

    fmt = _token_format_of(args.output)
    if not Path(args.video).is_file():
        raise FileNotFoundError(f"no video at {args.video}")
    if args.end is not None and args.end <= args.start:
        raise ValueError(f"--end ({args.end:g} s) must come after --start ({args.start:g} s)")
    result = asyncio.run(_with_client(args, lambda c: c.encode(args.video, resize=args.resize, fps=args.fps,
                                                               start=args.start or None, end=args.end)))
    Path(args.output).write_bytes(tokens.serialise(result, fmt))
    print(f"wrote {args.output}: {result.clips} clip(s), frames {result.metadata.get('n_frames')}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from coordtok.formats import tokens
    from coordtok.formats.video import OUTPUT_FORMATS

    fmt = Path(args.output).suffix.lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"{args.output}: the output ends in {_either(OUTPUT_FORMATS)}")
    parsed = tokens.parse(Path(args.tokens).read_bytes(), _token_format_of(args.tokens), None, max_clips=1 << 20)
    data = asyncio.run(_with_client(args, lambda c: c.decode(parsed, frames=args.frames, fmt=fmt, fps=args.fps,
                                                               restore_size=args.restore_size)))
    Path(args.output).write_bytes(data)
    print(f"wrote {args.output} ({len(data):,} bytes)")
    return 0


def cmd_encode_dataset(args: argparse.Namespace) -> int:
    """Every video under a folder -> token shards and a manifest (trainer/encode_dataset.py)."""
    from coordtok.service.app import load_served_model, model_identity, random_weights_warning
    from coordtok.trainer.encode_dataset import EncodeOptions, Tokenizer, run

    spec = model_setting(args)
    options = EncodeOptions(shard_size=args.shard_size, batch=args.batch, workers=args.workers, fps=args.fps,
                            precision=args.precision, max_shards=args.max_shards)
    if warning := random_weights_warning(spec):
        print(f"coordtok: warning: {warning}", file=sys.stderr)

    def load(device: torch.device) -> Tokenizer:
        return Tokenizer(load_served_model(spec, str(device)), *model_identity(spec))

    summary = run(args.folder, args.output, load, options)
    if summary.rank == 0:
        print(summary.text(args.output))
    return 0


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
            if app.state.generator is None:
                raise ValueError(f"no generator: {app.state.generator_problem}")
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


# GenerateRequest's fields -> the options of `coordtok generate` that set them.
_GENERATE_OPTIONS = {"num_videos": "-n/--num-videos", "steps": "--steps", "sampler": "--sampler", "seed": "--seed",
                     "guidance": "--guidance", "class_label": "--class-label", "format": "--format", "fps": "--fps"}


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
        raise ValueError(f"{option} {_must(problem)}, not {problem['input']}") from None


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


def frame_range(value: str) -> tuple[int, int]:
    """argparse type of --frames: A:B, frames A to B - 1."""
    first, colon, end = value.partition(":")
    try:
        a, b = int(first), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes A:B, the first frame and the frame after the last (e.g. 0:16), "
                                         f"not {value!r}") from None
    if a < 0:
        raise argparse.ArgumentTypeError(f"{value}: frames are numbered from 0")
    if b <= a:
        raise argparse.ArgumentTypeError(f"{value}: the range is {'reversed' if b < a else 'empty'}; A:B decodes frames "
                                         f"A to B - 1, so B must be greater than A (e.g. {min(a, b)}:{max(a, b + 1)})")
    return a, b


def server_url(value: str) -> str:
    """argparse type of --server: a URL (http://host:port), or host:port meaning http://host:port."""
    url = value if "://" in value else f"http://{value}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise argparse.ArgumentTypeError(f"{value!r}: expected the server's URL, e.g. http://localhost:8000 (or localhost:8000)")
    return url


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _add_model_options(parser: argparse.ArgumentParser, in_process_only: bool = False) -> None:
    where = "in-process only: " if in_process_only else ""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help=f"{where}the tokenizer's .safetensors file (default: the bundled model)")
    parser.add_argument("--random-weights", action="store_true",
                        help=f"{where}with --model PRESET (e.g. coordtok-tiny): that preset with random weights, for tests")


def build_parser() -> argparse.ArgumentParser:
    from coordtok.service.jobs.request import RESULT_TYPES

    parser = argparse.ArgumentParser(prog="coordtok", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=helptext, description=helptext, formatter_class=HelpFormatter)

    roundtrip = command("roundtrip", "encode and decode a real clip; print PSNR and SSIM beside the trilinear baseline's")
    roundtrip.add_argument("video", nargs="?", default=str(SAMPLE_CLIP),
                           help="the video to score (default: the sample clip shipped with the server, OpenCV's tree.avi)")
    _add_model_options(roundtrip)
    roundtrip.add_argument("--clips", type=positive_int, default=1, help="score at most this many clips of the video")
    roundtrip.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    roundtrip.add_argument("--json", action="store_true", help="print the report as JSON")
    roundtrip.set_defaults(run=cmd_roundtrip)

    serve = command("serve", "start the HTTP server (settings from COORDTOK_* variables)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    _add_model_options(serve)
    serve.add_argument("--generator", default=None, metavar="PATH",
                       help="the generator .safetensors, or none (default: the bundled one, if it fits the tokenizer)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="debug also shows the traceback of a failed start")
    serve.set_defaults(run=cmd_serve)

    for name, helptext in [("encode", "a video file -> a token file"), ("decode", "a token file -> a video")]:
        sub = command(name, helptext)
        if name == "encode":
            sub.add_argument("video", help="the video file (any container and codec FFmpeg reads)")
            sub.add_argument("-o", "--output", required=True, help="the token file: .safetensors, .npz or .json")
        else:
            sub.add_argument("tokens", help="a token file (.safetensors, .npz or .json) from encode or the server")
            sub.add_argument("-o", "--output", required=True, help="the video: .mp4 (H.264), .webm (VP9) or .npy (uint8 frames)")
        sub.add_argument("--server", type=server_url, default=None, metavar="URL",
                         help="the server, e.g. http://localhost:8000 (default: run the model in this process)")
        sub.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")
        _add_model_options(sub, in_process_only=True)
        if name == "encode":
            sub.add_argument("--resize", choices=["crop", "pad", "stretch"], default="crop",
                             help="how frames are fitted to the model's size")
            sub.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: the video's)")
            sub.add_argument("--start", type=float, default=0.0, help="the first second to encode")
            sub.add_argument("--end", type=float, default=None, help="the second to stop at (default: the end)")
            sub.set_defaults(run=cmd_encode)
        else:
            sub.add_argument("--frames", type=frame_range, default=None, metavar="A:B",
                             help="decode frames A to B - 1 only (default: all)")
            sub.add_argument("--fps", type=float, default=None, help="frame rate of the video (default: the source's)")
            sub.add_argument("--restore-size", action="store_true",
                             help="scale back to the source size (tokens encoded with --resize pad or stretch)")
            sub.set_defaults(run=cmd_decode)

    dataset = command("encode-dataset", "every video under a folder -> token shards and a manifest (torchrun for many GPUs)")
    dataset.add_argument("folder", metavar="DIR", help="the videos, in sub-folders or not (UCF-101's class folders as they are)")
    dataset.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="the folder for shard-*.safetensors and manifest.jsonl (a rerun continues where a run stopped)")
    _add_model_options(dataset)
    dataset.add_argument("--shard-size", type=positive_int, default=64, help="videos per shard")
    dataset.add_argument("--batch", type=positive_int, default=16, help="clips per forward pass")
    dataset.add_argument("--workers", type=int, default=2, help="processes decoding videos ahead of the model (0: none)")
    dataset.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: each video's)")
    dataset.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                         help="auto: bf16 autocast on GPUs, fp32 on the CPU")
    dataset.add_argument("--max-shards", type=positive_int, default=None,
                         help="stop after encoding this many shards (per process); run again to continue")
    dataset.set_defaults(run=cmd_encode_dataset)

    generate = command("generate", "generate videos with the SiT generator (in this process, or on a server with --url)")
    generate.add_argument("-n", "--num-videos", type=int, default=1, help="videos to generate")
    generate.add_argument("-o", "--output", required=True, help="folder for video_000.mp4, ...")
    generate.add_argument("--steps", type=int, default=50, help="sampling steps")
    generate.add_argument("--sampler", choices=["euler", "heun", "euler-maruyama"], default="euler", help="the ODE/SDE sampler")
    generate.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    generate.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (needs --class-label)")
    generate.add_argument("--class-label", type=int, default=None, help="the class, for a class-conditional generator")
    generate.add_argument("--format", choices=list(RESULT_TYPES), default="mp4", help="what each result file holds")
    generate.add_argument("--fps", type=float, default=None, help="frame rate of the videos (default 25)")
    generate.add_argument("--url", "--server", dest="server", type=server_url, metavar="URL", default=None,
                          help="the server, e.g. http://localhost:8000 (default: run the models in this process)")
    generate.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")
    _add_model_options(generate, in_process_only=True)
    generate.add_argument("--generator", default=None, metavar="PATH", help="in-process only: the generator .safetensors (default: bundled)")
    generate.add_argument("--device", default=None, help="in-process only: cpu, cuda, cuda:1 ... (default: cuda if available)")
    generate.add_argument("--batch-size", type=positive_int, default=4, help="in-process only: videos sampled together")
    generate.set_defaults(run=cmd_generate)

    importer = command("import-official", "convert a checkpoint of the public implementation")
    importer.add_argument("checkpoint", help="the public trainer's .pth checkpoint")
    importer.add_argument("--config", required=True, help="JSON of the reference constructor's keyword arguments")
    importer.add_argument("-o", "--output", required=True, help="output .safetensors path")
    importer.set_defaults(run=cmd_import_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    import pydantic

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except pydantic.ValidationError as error:  # a COORDTOK_* setting out of range (before ValueError, its base)
        print(f"coordtok: error: {_settings_problem(error)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:
        print(f"coordtok: error: {error}", file=sys.stderr)
        return 2
    except httpx.TransportError as error:
        print(f"coordtok: error: {_unreachable(args.server, error)}", file=sys.stderr)
        return 1
    except (RuntimeError, httpx.HTTPError) as error:  # a server refused (ServerError), a failed job
        print(f"coordtok: error: {error}", file=sys.stderr)
        return 1


def _must(problem: dict) -> str:
    """A pydantic error's message as "must be ...": "Input should be greater than 0" -> "must be greater than 0"."""
    message = problem["msg"]
    return "must be" + message[len("Input should be"):] if message.startswith("Input should be") else message.lower()


def _settings_problem(error) -> str:
    problem = error.errors()[0]
    return f"the setting COORDTOK_{str(problem['loc'][0]).upper()}={problem.get('input')!r} {_must(problem)}"


def _unreachable(url: str | None, error: httpx.TransportError) -> str:
    """What to say when the server at `url` did not answer."""
    if isinstance(error, httpx.ConnectError):
        return (f"nothing answers at {url} ({error}): is the server running? Start one with `coordtok serve`, "
                "or leave out --server to run the model in this process")
    return f"the server at {url} did not answer ({type(error).__name__}: {error or 'no details'})"


if __name__ == "__main__":
    sys.exit(main())
