"""`nextchar serve`: flags override NEXTCHAR_* environment variables (one settings object).

    nextchar serve --model artifacts/demo --backend onnx --device auto --port 50051
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any, get_args

from pydantic import ValidationError

from .artifact import ArtifactError
from .backends import DeviceUnavailable
from .settings import ServerSettings

log = logging.getLogger("nextchar.server")


def build_parser() -> argparse.ArgumentParser:
    """One flag per settings field, generated so flags, env vars and docs never drift apart."""
    p = argparse.ArgumentParser(
        prog="nextchar serve",
        description="Serve a nextchar artifact over gRPC. Every flag also reads NEXTCHAR_<NAME>.",
        argument_default=argparse.SUPPRESS,  # unset flags leave env/default values alone
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env NEXTCHAR_{name.upper()}, default {field.default}]"
        choices = get_args(field.annotation) or None
        if field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            p.add_argument(flag, dest=name, choices=choices, help=help_text)
    return p


def settings_from_args(argv: list[str]) -> ServerSettings:
    args: dict[str, Any] = vars(build_parser().parse_args(argv))
    return ServerSettings(**args)


async def _serve(settings: ServerSettings) -> None:
    from .app import NextCharServer  # imported late: grpc start-up cost only when serving

    server = NextCharServer(settings)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        if stopping:
            return
        log.info("%s: draining (grace %.1fs)", sig.name, settings.grace_s)
        stopping.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    port = await server.start()
    print(f"nextchar serving on {settings.host}:{port}", flush=True)
    await server.wait()


def main(argv: list[str]) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"nextchar serve: invalid {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(settings))
    except (ArtifactError, DeviceUnavailable, OSError) as e:
        print(f"nextchar serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
