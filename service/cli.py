"""The `coordtok` command."""
from __future__ import annotations

import argparse
import sys

import httpx

from coordtok.service.commands import codec, dataset, generate, import_official, roundtrip, serve
from coordtok.service.commands.common import HelpFormatter, must

COMMANDS = (roundtrip, serve, codec, dataset, generate, import_official)  # in the order `coordtok --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordtok", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_to(commands)
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


def _settings_problem(error) -> str:
    problem = error.errors()[0]
    return f"the setting COORDTOK_{str(problem['loc'][0]).upper()}={problem.get('input')!r} {must(problem)}"


def _unreachable(url: str | None, error: httpx.TransportError) -> str:
    """What to say when the server at `url` did not answer."""
    if isinstance(error, httpx.ConnectError):
        return (f"nothing answers at {url} ({error}): is the server running? Start one with `coordtok serve`, "
                "or leave out --server to run the model in this process")
    return f"the server at {url} did not answer ({type(error).__name__}: {error or 'no details'})"


if __name__ == "__main__":
    sys.exit(main())
