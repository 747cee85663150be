"""`coordtok serve`: the HTTP server under uvicorn, on a socket bound before the models load, that
drains its requests on the first SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
import threading
import time

import uvicorn

from coordtok.service.commands.common import add_command, add_model_options, model_setting

# Idle keep-alive connections stay open longer than clients and proxies keep theirs (httpx 5 s,
# nginx 60 s): at uvicorn's default of 5 s a request sent as the server closes the connection
# is lost (seen under load as connection resets the server never logged).
KEEP_ALIVE_S = 75


def add_to(commands) -> None:
    serve = add_command(commands, "serve", "start the HTTP server (settings from COORDTOK_* variables)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    add_model_options(serve)
    serve.add_argument("--generator", default=None, metavar="PATH",
                       help="the generator .safetensors, or none (default: the bundled one, if it fits the tokenizer)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="debug also shows the traceback of a failed start")
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from coordtok.service.app import create_app
    from coordtok.service.logs import configure_logging
    from coordtok.service.protocol import header_timeout_protocol
    from coordtok.service.settings import Settings

    model = model_setting(args)
    settings = Settings(**({"model": model} if model else {}), **({"generator": args.generator} if args.generator else {}))
    # Listening before the models load: a busy port fails at once, and nothing of the jobs dir
    # (its lock, the recovery of interrupted jobs) is touched by a server that cannot serve.
    listener = listening_socket(args.host, args.port)
    configure_logging(settings.log_format, logging.getLevelNamesMapping()[args.log_level.upper()])
    app = create_app(settings, address=f"{args.host}:{listener.getsockname()[1]}")
    logging.getLogger("uvicorn.error").addFilter(StartupFailureAtDebug(app))
    # Headers must arrive within COORDTOK_HEADER_TIMEOUT_S (service/protocol.py).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_S, http=header_timeout_protocol(settings.header_timeout_s))
    try:
        DrainingServer(config, app, settings.drain_timeout_s).run(sockets=[listener])
    except SystemExit:  # uvicorn's exit when start-up failed (logged): say why in one line
        problem = app.state.startup_error
        if problem is None:
            raise
        print(f"coordtok: error: {problem}", file=sys.stderr)
        return 2
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port), for uvicorn to serve; ValueError saying why when
    the address cannot be had (a port in use, a host that is not this machine's). It listens at
    once: a socket only bound holds no port (another with SO_REUSEADDR could bind it too)."""
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
    sock.listen(2048)  # uvicorn's backlog
    return sock


class StartupFailureAtDebug(logging.Filter):
    """uvicorn logs a failed start-up as errors with the whole traceback; once the app has recorded
    why it cannot start (`app.state.startup_error`, which `coordtok serve` prints as one line),
    those records go out at debug level (`--log-level debug` shows them)."""

    def __init__(self, app) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or self.app.state.startup_error is None:
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
        runtime = self.app.state.runtime
        if runtime is None or not runtime.engine.accepting:  # not started, or a second signal: exit now
            return super().handle_exit(sig, frame)
        engine = runtime.engine
        engine.stopping.set()  # the one stop signal: no new work, the generation lane requeues its job

        def drain() -> None:
            deadline = time.monotonic() + self.drain_timeout_s
            while engine.in_system and time.monotonic() < deadline:
                time.sleep(0.05)
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, name="coordtok-drain", daemon=True).start()
