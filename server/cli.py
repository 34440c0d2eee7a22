"""`nextchar serve`: flags override NEXTCHAR_* environment variables (one settings object).

    nextchar serve --model runs/demo/artifact --backend onnx --device auto --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from .artifact import ArtifactError
from .backends import DeviceUnavailable
from .logging_setup import configure_logging
from .security import SecurityConfigError, tls_flags_problem
from .settings import ServerSettings, host_port

log = logging.getLogger("nextchar.server")

GC_GEN0_THRESHOLD = 20_000  # the default is 700: see tune_gc

# Secrets are read from the environment only: a flag would show them in `ps` and shell history.
ENV_ONLY = {"auth_tokens"}


def build_parser() -> argparse.ArgumentParser:
    """One flag per settings field, generated so flags, env vars and docs never drift apart."""
    p = argparse.ArgumentParser(
        prog="nextchar serve",
        description="Serve nextchar models over gRPC (nextchar.v1, KServe V2, Admin on one "
        "port) and HTTP (KServe V2 REST, OpenAI-compatible completions, nextchar JSON on "
        "--http-port; --no-http turns it off): one artifact (--model DIR), or every model of a repository "
        "(--model-repository DIR). Every flag also reads NEXTCHAR_<NAME>.",
        epilog="Model repository (docs/models.md): DIR/<model>/<version>/ artifacts (or "
        "DIR/<model>/ as one artifact), optional DIR/<model>/config.json of per-model "
        "settings; a model's name is its folder, its version the version folder (highest "
        "served). Requests name a model (empty: the default model) and a priority: high "
        "(interactive, the default) or low (batch jobs; nextchar batch's default), each lane "
        "with its own queue bound and timeout.",
        argument_default=argparse.SUPPRESS,  # unset flags leave env/default values alone
    )
    for name, field in ServerSettings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env NEXTCHAR_{name.upper()}, default {field.default}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, dest=name, choices=choices, help=help_text)
    return p


def flags_from_args(argv: list[str]) -> dict[str, Any]:
    """The settings given on the command line (the rest come from NEXTCHAR_* or defaults)."""
    return vars(build_parser().parse_args(argv))


def settings_from_args(argv: list[str]) -> ServerSettings:
    return ServerSettings(**flags_from_args(argv))


def setting_name(field: str, flags: Mapping[str, Any]) -> str:
    """What the user wrote for a setting: its flag if given, else its variable (flags win, so a
    value not on the command line came from the environment)."""
    if field in flags:
        return "--" + field.replace("_", "-")
    return f"NEXTCHAR_{field.upper()}"


def serving_lines(settings: ServerSettings, port: int, metrics_port: int | None,
                  http_port: int | None) -> list[str]:
    """What `nextchar serve` prints once SERVING: an address a client can dial ([::1]:50051),
    then URLs; each on the host its listener is bound to."""
    lines = [f"nextchar serving on {host_port(settings.host, port)}"]
    if metrics_port is not None:
        lines.append(f"nextchar metrics on "
                     f"http://{host_port(settings.metrics_host, metrics_port)}/metrics")
    if http_port is not None:  # a later line: readers of the lines above are unchanged
        scheme = "https" if settings.tls_cert is not None else "http"
        lines.append(f"nextchar http on {scheme}://{host_port(settings.host, http_port)}")
    return lines


async def _serve(settings: ServerSettings) -> None:
    from .app import NextCharServer  # imported late: grpc start-up cost only when serving

    server = NextCharServer(settings)
    loop = asyncio.get_running_loop()
    starting = loop.create_task(server.start())
    stopping: list[asyncio.Task[None]] = []

    async def drain(grace_s: float | None, prestop_s: float | None) -> None:
        await asyncio.wait([starting])  # a signal during start-up drains what started
        await server.stop(grace_s, prestop_s)

    def on_signal(sig: signal.Signals) -> None:
        if stopping:  # a second signal: stop now, cancelling what still runs
            log.warning("%s again: stopping now", sig.name)
            stopping.append(loop.create_task(server.stop_now()))
            return
        log.info("%s: draining (pre-stop %.1fs, grace %.1fs)", sig.name, settings.prestop_s,
                 settings.grace_s)
        stopping.append(loop.create_task(drain(None, None)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, server.request_reload, "SIGHUP")
    port = await starting
    tune_gc()
    for line in serving_lines(settings, port, server.metrics_port, server.http_port):
        print(line, flush=True)
    await server.wait()
    await asyncio.gather(*stopping)


def tune_gc() -> None:
    """Once the model is loaded: freeze what exists and collect the young generation less often.

    A full collection walks every tracked object (~50k here once ONNX Runtime, gRPC and the
    model are loaded, ~13 ms), stalling the event loop and every call waiting on it; frozen
    objects are skipped. Each request allocates a few hundred short-lived objects, so the default
    gen-0 threshold (700) collects several times per request batch. Measured (docs/benchmarks.md):
    p99 at concurrency 64 fell from ~90 to ~67 ms with both.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, or None for asyncio's default. Why uvloop: every RPC costs the event loop
    callbacks, futures and wake-ups, and the loop thread is the server's per-request limit
    (docs/benchmarks.md); grpc.aio runs on any asyncio loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


class PortInUse(OSError):
    """The gRPC port is taken: said in one line, before the model is loaded."""


def check_ports_free(settings: ServerSettings) -> None:
    """The gRPC port, and the HTTP and metrics ports when they are on, before the model loads."""
    chosen = [("--port", settings.port)]
    if getattr(settings, "http", False):
        chosen.append(("--http-port", getattr(settings, "http_port", 0)))
    metrics_host = getattr(settings, "metrics_host", None) or settings.host
    if _overlap(metrics_host, settings.host):
        chosen.append(("--metrics-port", getattr(settings, "metrics_port", None) or 0))
    seen: dict[int, str] = {}
    for flag, port in chosen:  # two of our own on one port: not "another server"
        if port and port in seen:
            raise OSError(f"{seen[port]} and {flag} are both {port}: give each its own port")
        seen[port] = flag
    check_port_free(settings.host, settings.port)
    if getattr(settings, "http", False) and getattr(settings, "http_port", 0):
        check_port_free(settings.host, settings.http_port, "--http-port", "HTTP ")
    metrics_port = getattr(settings, "metrics_port", None)
    if metrics_port:
        check_port_free(metrics_host, metrics_port, "--metrics-port", "metrics ",
                        host_flag="--metrics-host")


def _addresses(host: str) -> set[str] | None:
    """The addresses a bind on `host` takes; None for a wildcard (every address)."""
    if host in ("", "0.0.0.0", "::"):
        return None
    try:
        return {str(i[4][0]) for i in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):  # UnicodeError: a label IDNA cannot encode
        return set()  # unresolvable: check_port_free names it


def _overlap(a: str, b: str) -> bool:
    """Whether binds on hosts a and b can collide: `localhost` and `127.0.0.1` do."""
    if a == b:
        return True
    aa, bb = _addresses(a), _addresses(b)
    return aa is None or bb is None or bool(aa & bb)


def check_port_free(host: str, port: int, flag: str = "--port", what: str = "",
                    host_flag: str = "--host") -> None:
    """Binds (and closes) a plain socket on the address gRPC will bind, so a taken port fails in
    one line before the model loads, and without gRPC core's own error log line. gRPC binds with
    SO_REUSEADDR (and here without SO_REUSEPORT), so this does too; the start still reports a
    port taken in between (see `_serve`)."""
    if port == 0:
        return
    where = f"{what}{host_port(host, port)}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:  # gRPC's bind would say only "cannot bind"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise OSError(f"cannot bind {where}: {host_flag} {host} does not resolve "
                      f"({reason})") from e
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse(f"{where} is already in use (another server?): "
                                    f"stop it, or pick another {flag} (0 picks a free one)"
                                    ) from e
                if e.errno == errno.EADDRNOTAVAIL:
                    raise OSError(f"cannot bind {where}: {host} is not an address of this "
                                  f"machine ({host_flag})") from e
                if e.errno == errno.EACCES:
                    raise OSError(f"cannot bind {where}: permission denied (ports "
                                  f"below 1024 need privileges; pick another {flag})") from e
                raise


def misspelled_variables(environ: Mapping[str, str]) -> list[str]:
    """A NEXTCHAR_* variable that is no setting but close to one (NEXTCHAR_METRIC_PORT): settings
    ignore unknown variables (compose and the deploy scripts set their own NEXTCHAR_* ones), so
    a typo would otherwise leave its setting at the default without a word."""
    import difflib

    from ..client.cli import ENV_DEFAULTS  # the client's own: NEXTCHAR_SERVER, _TOKEN, _TLS_CA

    known = {f"NEXTCHAR_{name.upper()}" for name in ServerSettings.model_fields}
    lines = []
    for name in sorted(environ):
        if name.startswith("NEXTCHAR_") and name not in known | set(ENV_DEFAULTS.values()):
            # 0.9: a letter or two off (METRIC_PORT, DEVICES), not another word (HOST_PORTS).
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.9)
            if close:
                lines.append(f"{name} is not a setting and is ignored: did you mean {close[0]}?")
    return lines


def main(argv: list[str]) -> int:
    flags = flags_from_args(argv)
    for field in ("model", "model_repository"):  # Path("") would be ".", the current folder
        if flags.get(field) == "":
            print(f"nextchar serve: {setting_name(field, flags)} is empty: give a directory",
                  file=sys.stderr)
            return 2
    try:
        settings = ServerSettings(**flags)
    except ValidationError as e:
        err = e.errors()[0]
        name = setting_name(str(err["loc"][0]), flags) if err["loc"] else "settings"
        print(f"nextchar serve: invalid {name}: {err['msg']}", file=sys.stderr)
        return 2
    model = getattr(settings, "model", None)
    if model is not None and Path(model).is_file():
        print(f"nextchar serve: --model {model} is a file, not a directory (an "
              f"artifact directory holds manifest.json and the model files)", file=sys.stderr)
        return 2
    problem = tls_flags_problem(settings)
    if problem is not None:
        print(f"nextchar serve: {problem}", file=sys.stderr)
        return 2
    try:
        check_ports_free(settings)
    except OSError as e:
        print(f"nextchar serve: {e}", file=sys.stderr)
        return 1
    if not isinstance(logging.getLevelName(str(settings.log_level).upper()), int):
        print(f"nextchar serve: invalid {setting_name('log_level', flags)} "
              f"{settings.log_level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    for line in misspelled_variables(os.environ):
        log.warning("%s", line)
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
    try:
        loop_factory = event_loop_factory(settings.event_loop)
    except ImportError:
        print("nextchar serve: --event-loop uvloop needs uvloop: pip install 'nextchar[serve]'",
              file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(settings))
    except (ArtifactError, DeviceUnavailable, SecurityConfigError, OSError) as e:
        print(f"nextchar serve: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except RuntimeError as e:
        # grpc's add_*_port raises RuntimeError("Failed to bind to address ...") when the port
        # was taken after check_port_free; anything else is a bug and keeps its traceback.
        if "bind" not in str(e):
            raise
        print(f"nextchar serve: cannot bind {host_port(settings.host, settings.port)} (in use, "
              f"or not an address of this machine): pick another --port or --host",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
