"""The `coordtok` command."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from model.triplane import to_uint8

KEEP_ALIVE_S = 75


def moving_shapes_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A synthetic clip [frames, height, width, 3] in [-1, 1]: a smooth colour gradient with a
    bright disc moving across it, so that reconstructions are easy to judge by eye and by PSNR."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames).float()[:, None, None]
    x = torch.linspace(0, 1, height)[None, :, None]
    y = torch.linspace(0, 1, width)[None, None, :]
    phase = torch.rand(3, generator=g) * 2 * math.pi
    base = torch.stack([torch.sin(2 * math.pi * (x + y) / 2 + t / frames * 2 + p) for p in phase], dim=-1)
    cx = 0.5 + 0.3 * torch.sin(2 * math.pi * t / frames)
    cy = 0.2 + 0.6 * t / max(frames - 1, 1)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.02).float()[..., None]
    return (0.6 * base * (1 - disc) + disc).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (compared in [0, 1])."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from model import load_model

    model = load_model(args.model, device=args.device)
    c = model.config
    video = moving_shapes_clip(c.frames, c.height, c.width, seed=args.seed)[None].to(next(model.parameters()).device)
    with torch.inference_mode():
        start = time.perf_counter()
        triplane = model.encode(video)
        encoded = time.perf_counter()
        recon = model.decode_video(triplane)
        decoded = time.perf_counter()
    report = {
        "model": str(args.model or "default"),
        "device": str(video.device),
        "clip": [c.frames, c.height, c.width],
        "tokens": c.tokens,
        "floats_per_clip": c.tokens * c.latent_channels,
        "encode_s": round(encoded - start, 3),
        "decode_s": round(decoded - encoded, 3),
        "psnr_db": round(psnr(recon, video), 2),
    }
    print(json.dumps(report, indent=2))
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from model import load_official, save_model

    model = load_official(args.checkpoint, args.config, device="cpu")
    save_model(model, args.output, metadata={"source": Path(args.checkpoint).name})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.logs import configure_logging
    from service.protocol import header_timeout_protocol
    from service.settings import Settings

    settings = Settings(**({"model": args.model} if args.model else {}), **({"generator": args.generator} if args.generator else {}))
    configure_logging(settings.log_format)
    app = create_app(settings)
    # Idle keep-alive connections stay open longer than clients and proxies keep theirs (httpx 5 s,
    # nginx 60 s): at uvicorn's default of 5 s a request sent as the server closes the connection
    # is lost (seen under load as connection resets the server never logged).
    # Headers must arrive within COORDTOK_HEADER_TIMEOUT_S (service/protocol.py).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S, http=header_timeout_protocol(settings.header_timeout_s))
    try:
        DrainingServer(config, app, settings.drain_timeout_s).run()
    except SystemExit:  # uvicorn's exit when start-up failed (logged): say why in one line
        problem = getattr(app.state, "startup_error", None)
        if problem is None:
            raise
        print(f"coordtok: error: {problem}", file=sys.stderr)
        return 2
    return 0


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT stops readiness and new work (503) at once,
    then exits when the requests in flight are done or `drain_timeout_s` has passed."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_timeout_s = app, drain_timeout_s

    def handle_exit(self, sig, frame) -> None:
        engine = getattr(self.app.state, "engine", None)
        if engine is None or not engine.accepting:  # not started, or a second signal: exit now
            return super().handle_exit(sig, frame)
        engine.accepting = False

        def drain() -> None:
            deadline = time.monotonic() + self.drain_timeout_s
            while engine.in_system and time.monotonic() < deadline:
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="coordtok-drain", daemon=True).start()


async def _with_client(args: argparse.Namespace, action):
    """Run `action(client)` against --server, or against the app in this process."""
    from service.client import AsyncClient

    if args.server:
        async with AsyncClient(args.server, api_key=args.api_key) as client:
            return await action(client)
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(generator="none", **({"model": args.model} if args.model else {})))
    async with app.router.lifespan_context(app):
        async with AsyncClient("http://in-process", transport=httpx.ASGITransport(app=app)) as client:
            return await action(client)


def _token_format_of(path: str) -> str:
    suffix = Path(path).suffix.lstrip(".")
    if suffix not in ("safetensors", "npz", "json"):
        raise ValueError(f"{path}: token files end in .safetensors, .npz or .json")
    return suffix


def cmd_encode(args: argparse.Namespace) -> int:
    from service import tokens

    fmt = _token_format_of(args.output)
    result = asyncio.run(_with_client(args, lambda c: c.encode(args.video, resize=args.resize, fps=args.fps)))
    Path(args.output).write_bytes(tokens.serialise(result, fmt))
    print(f"wrote {args.output}: {result.clips} clip(s), frames {result.metadata.get('n_frames')}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from service import tokens

    parsed = tokens.parse(Path(args.tokens).read_bytes(), _token_format_of(args.tokens), None, max_clips=1 << 20)
    frames = tuple(int(x) for x in args.frames.split(":")) if args.frames else None
    fmt = Path(args.output).suffix.lstrip(".")
    if fmt not in ("mp4", "webm", "npy"):
        raise ValueError(f"{args.output}: the output ends in .mp4, .webm or .npy")
    data = asyncio.run(_with_client(args, lambda c: c.decode(parsed, frames=frames, fmt=fmt, fps=args.fps)))
    Path(args.output).write_bytes(data)
    print(f"wrote {args.output} ({len(data):,} bytes)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate videos: through a server's job API (--url), or with the models in this process."""
    from service import jobs

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    extension, _ = jobs.RESULT_TYPES[args.format]
    request = jobs.GenerateRequest(num_videos=args.num_videos, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                   guidance=args.guidance, class_label=args.class_label, format=args.format,
                                   **({"fps": args.fps} if args.fps else {}))
    paths = [out / f"video_{k:03d}.{extension}" for k in range(args.num_videos)]
    if args.server:
        seed = _generate_on_server(args, request, paths)
    else:
        seed = _generate_here(args, request, paths)
    print(f"wrote {len(paths)} file(s) to {out} (seed {seed})")
    return 0


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


def _generate_on_server(args: argparse.Namespace, request, paths: list[Path]) -> int:
    from service.client import Client

    show = _ProgressPrinter()
    with Client(args.server, api_key=args.api_key) as client:
        options = request.model_dump()
        job = client.generate(fmt=options.pop("format"), **options)
        try:
            job = client.wait(job["id"], poll_s=0.5, on_progress=lambda j: show(f"job {j['id'][:8]} {_progress_line(j)}"))
        except KeyboardInterrupt:
            client.cancel(job["id"])
            show.done()
            print(f"cancelled job {job['id']}", file=sys.stderr)
            raise
        show.done()
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job['id']} {job['status']}: {job['error'] or 'no results'}")
        for k, path in enumerate(paths):
            path.write_bytes(client.result(job["id"], k))
    return job["request"]["seed"]


def _generate_here(args: argparse.Namespace, request, paths: list[Path]) -> int:
    import secrets

    from model import load_model
    from service import jobs
    from service.app import model_identity

    tokenizer = load_model(args.model, device=args.device)
    device = next(tokenizer.parameters()).device
    model_id, sha256 = model_identity(args.model or "")
    generator, problem = jobs.load_generator(args.generator or "", sha256, tokenizer.config, device)
    if generator is None:
        raise ValueError(f"no generator: {problem}")
    try:
        generator.check(request)
    except jobs.JobError as error:
        raise ValueError(str(error)) from None
    job = {**request.model_dump(), "seed": request.seed if request.seed is not None else secrets.randbelow(2**31)}
    identity = jobs.token_identity(tokenizer.config, model_id, sha256, generator.model_id)
    show = _ProgressPrinter()
    for group in jobs.groups(request.num_videos, args.batch_size):
        def on_step(step: int, total: int) -> None:
            show(f"videos {group.start + 1}-{group.stop} of {request.num_videos}, step {step} of {total}")

        triplanes = generator.sample(job, group.start, len(group), on_step)
        for k in group:
            one = triplanes[k - group.start]
            frames = None
            if request.format != "tokens":
                with torch.inference_mode():
                    frames = to_uint8(tokenizer.decode_video(one.to(device))).cpu().numpy()[0]
            paths[k].write_bytes(jobs.render(job, k, one, frames, identity))
    show.done()
    return job["seed"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordtok", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    roundtrip = commands.add_parser("roundtrip", help="encode and decode a generated clip, print PSNR and timings")
    roundtrip.add_argument("--model", default=None, help="a .safetensors path or a preset name (default: the bundled model)")
    roundtrip.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    roundtrip.add_argument("--seed", type=int, default=0)
    roundtrip.set_defaults(run=cmd_roundtrip)

    serve = commands.add_parser("serve", help="start the HTTP server (settings from COORDTOK_* variables)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=None, help="a .safetensors path or preset (default: the bundled model)")
    serve.add_argument("--generator", default=None, help="the generator .safetensors (default: the bundled one, if any)")
    serve.set_defaults(run=cmd_serve)

    for name, helptext in [("encode", "a video file -> a token file"), ("decode", "a token file -> a video")]:
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("video" if name == "encode" else "tokens")
        sub.add_argument("-o", "--output", required=True,
                         help=".safetensors/.npz/.json" if name == "encode" else ".mp4/.webm/.npy")
        sub.add_argument("--server", default=None, help="server URL (default: run the model in this process)")
        sub.add_argument("--api-key", default=None)
        sub.add_argument("--model", default=None, help="in-process only: a .safetensors path or preset")
        sub.add_argument("--fps", type=float, default=None)
        if name == "encode":
            sub.add_argument("--resize", choices=["crop", "pad", "stretch"], default="crop")
            sub.set_defaults(run=cmd_encode)
        else:
            sub.add_argument("--frames", default=None, help="A:B, the frame range to decode")
            sub.set_defaults(run=cmd_decode)

    generate = commands.add_parser("generate", help="generate videos with the SiT generator (locally, or on a server with --url)")
    generate.add_argument("-n", "--num-videos", type=int, default=1)
    generate.add_argument("-o", "--output", required=True, help="folder for video_000.mp4, ...")
    generate.add_argument("--steps", type=int, default=50, help="sampling steps")
    generate.add_argument("--sampler", choices=["euler", "heun", "euler-maruyama"], default="euler")
    generate.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    generate.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (needs --class-label)")
    generate.add_argument("--class-label", type=int, default=None)
    generate.add_argument("--format", choices=["mp4", "webm", "tokens"], default="mp4")
    generate.add_argument("--fps", type=float, default=None, help="frame rate of the videos (default 25)")
    generate.add_argument("--url", "--server", dest="server", metavar="URL", default=None, help="server URL (default: run the models in this process)")
    generate.add_argument("--api-key", default=None)
    generate.add_argument("--model", default=None, help="in-process only: the tokenizer (.safetensors or preset; default: bundled)")
    generate.add_argument("--generator", default=None, help="in-process only: the generator .safetensors (default: bundled)")
    generate.add_argument("--device", default=None, help="in-process only: cpu, cuda, cuda:1 ...")
    generate.add_argument("--batch-size", type=int, default=4, help="in-process only: videos sampled together")
    generate.set_defaults(run=cmd_generate)

    importer = commands.add_parser("import-official", help="convert a checkpoint of the public implementation")
    importer.add_argument("checkpoint", help="the public trainer's .pth checkpoint")
    importer.add_argument("--config", required=True, help="JSON of the reference constructor's keyword arguments")
    importer.add_argument("-o", "--output", required=True, help="output .safetensors path")
    importer.set_defaults(run=cmd_import_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"coordtok: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, httpx.HTTPError) as error:  # a server refused (ServerError) or is unreachable, a failed job
        print(f"coordtok: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
