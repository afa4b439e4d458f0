"""Command-line options that can also be set from the environment.

Every option ``--some-thing`` can be given as the environment variable
``EMOTION_SOME_THING``; a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import NoReturn

from . import ports
from .protocol import MAX_CLOCK_SKEW_S, MAX_FRAME_PIXELS

ENV_PREFIX = "EMOTION_"
CONFIG_ERROR = 78  # exit status for "fix the configuration": supervisors do not restart it
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


class ServiceParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``option`` reads defaults from EMOTION_* variables."""

    def option(self, flag: str, *, default=None, type=str, help: str = "", **kwargs):
        env = env_name(flag)
        raw = os.environ.get(env)
        if type is bool:
            value = default if raw is None else self._parse_bool(env, raw)
            self.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=value,
                help=f"{help} [env {env}, default: {'yes' if value else 'no'}]",
                **kwargs,
            )
            return
        value = default
        if raw is not None:
            try:
                value = type(raw)
            except (TypeError, ValueError) as exc:
                self.error(f"environment variable {env}={raw!r} is invalid: {exc}")
        self.add_argument(
            flag, default=value, type=type, help=f"{help} [env {env}, default: %(default)s]", **kwargs
        )

    def _parse_bool(self, env: str, raw: str) -> bool:
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        self.error(f"environment variable {env}={raw!r} is not a yes/no value")


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"{text} is not a number >= 0")
    return value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text} is not a number > 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not an integer >= 1")
    return value


def service_parser(
    name: str, description: str, connects: bool = True, metrics_port: int | None = None
) -> ServiceParser:
    """The parser every service starts from: broker address, metrics port (by default the
    service's place in the port layout, services/common/ports.py), logging."""
    parser = ServiceParser(prog=f"python -m services.{name}", description=description)
    if connects:
        parser.option("--broker-host", default="127.0.0.1", help="host name or address of the broker")
    parser.option(
        "--base-port",
        default=ports.BROKER_BASE_PORT,
        type=int,
        help="first of the broker's 10 consecutive ports (see docs/protocol.md)",
    )
    if metrics_port is None:
        metrics_port = ports.metrics_port(name)
    parser.option(
        "--metrics-port",
        default=metrics_port,
        type=int,
        help="port of the Prometheus /metrics endpoint (0 = none)",
    )
    parser.option(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics endpoint binds (0.0.0.0 in containers)",
    )
    parser.option(
        "--curve-keys",
        default="",
        help="CurveZMQ key folder: encrypt and authenticate every broker connection "
        "(make one with python -m services.common.keys DIR; empty = off)",
    )
    parser.option(
        "--max-clock-skew-ms",
        default=MAX_CLOCK_SKEW_S * 1000,
        type=non_negative,
        help="refuse messages stamped further in the future than this (reason clock; "
        "0 = no check): clocks of the machines must agree within it",
    )
    parser.option(
        "--max-frame-pixels",
        default=MAX_FRAME_PIXELS,
        type=positive_int,
        help="largest frame (width x height) decoded or published; larger ones are "
        "refused before decoding (reason dimensions), capture downscales to it",
    )
    parser.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser


STREAM_TIMEOUT_S = 60.0


def stream_timeout_option(parser: ServiceParser, forgets: str) -> None:
    """``--stream-timeout-s``, the same in every stage that keeps something per stream:
    a stream silent this long is forgotten, so stream ids that come and go (cameras added
    and removed) leave nothing behind."""
    parser.option(
        "--stream-timeout-s",
        default=STREAM_TIMEOUT_S,
        type=positive,
        help=f"forget a stream that has sent nothing for this many seconds: {forgets}",
    )


def setup_logging(name: str, level: str) -> logging.Logger:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {name} %(levelname)s %(message)s")
    return logging.getLogger(name)


def config_error(service: str, message: str) -> NoReturn:
    """Stop a service that cannot run as configured (no model, no such file, ...)."""
    print(f"{service}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_ERROR)


def lower_priority(by: int) -> None:
    """Raise the calling thread's niceness by ``by``; the threads it starts afterwards inherit
    it, those already running (ZeroMQ's I/O thread, once a socket exists) keep theirs."""
    if by > 0:
        tid = threading.get_native_id() if sys.platform == "linux" else 0  # elsewhere: the process
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
