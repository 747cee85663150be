"""What several commands share: the model options, argument types, and a client of --server or of
the app run in this process."""
from __future__ import annotations

import argparse
import math

import httpx


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def add_command(commands, name: str, helptext: str) -> argparse.ArgumentParser:
    """A sub-command of `coordtok`, its help as its description."""
    return commands.add_parser(name, help=helptext, description=helptext, formatter_class=HelpFormatter)


def add_model_options(parser: argparse.ArgumentParser, in_process_only: bool = False) -> None:
    where = "in-process only: " if in_process_only else ""
    parser.add_argument("--model", default=None, metavar="PATH",
                        help=f"{where}the tokenizer's .safetensors file (default: the bundled model)")
    parser.add_argument("--random-weights", action="store_true",
                        help=f"{where}with --model PRESET (e.g. coordtok-tiny): that preset with random weights, for tests")


def add_server_options(parser: argparse.ArgumentParser, *names: str, runs: str = "the model") -> None:
    """--server (or `names`) and --api-key: a server to run on instead of this process, which runs `runs`."""
    parser.add_argument(*(names or ("--server",)), dest="server", type=server_url, default=None, metavar="URL",
                        help=f"the server, e.g. http://localhost:8000 (default: run {runs} in this process)")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")


def model_setting(args: argparse.Namespace) -> str:
    """The model setting that --model and --random-weights name: '' (the bundled weights), a
    .safetensors path, or `preset:NAME` (random weights, asked for explicitly)."""
    from coordtok.model import PRESETS
    from coordtok.service.model_setting import RANDOM_PREFIX

    if getattr(args, "random_weights", False):
        if args.model not in PRESETS:
            raise ValueError(f"--random-weights needs --model PRESET, one of {', '.join(sorted(PRESETS))}")
        return RANDOM_PREFIX + args.model
    return args.model or ""


async def with_client(args: argparse.Namespace, action):
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


def positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {value}")
    return number


def must(problem: dict) -> str:
    """A pydantic error's message as "must be ...": "Input should be greater than 0" -> "must be greater than 0"."""
    message = problem["msg"]
    return "must be" + message[len("Input should be"):] if message.startswith("Input should be") else message.lower()
