"""``pipefleet gateway --config PATH [--host H] [--port P] [--workers N] [--insecure]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from config.loader import CONFIG_ENV, load_config
from gateway.security import check_bind
from producers.errors import PipefleetError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8000
"""Where the gateway listens unless ``--port`` says otherwise."""


def build_parser() -> argparse.ArgumentParser:
    """The ``pipefleet gateway`` argument parser."""
    parser = argparse.ArgumentParser(prog="pipefleet gateway",
                                     description="HTTP jobs API and OpenAI-compatible API in front of the fleet")
    parser.add_argument("--config", help=f"fleet TOML (default: ${CONFIG_ENV} or the shipped config/fleet.toml)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback address with no API key configured")
    parser.add_argument("--log-level", default="info")
    return parser


def app_from_env():
    """The app for ``$PIPEFLEET_CONFIG``: the factory each uvicorn worker process calls."""
    from gateway.app import create_app

    return create_app(load_config())


def run(args: argparse.Namespace) -> int:
    """Check the config and the bind rule, then serve until interrupted."""
    import uvicorn

    try:
        config = load_config(args.config)
        check_bind(args.host, has_keys=bool(config.gateway.api_keys), insecure=args.insecure)
    except PipefleetError as error:
        print(f"pipefleet gateway: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if config.source:
        os.environ[CONFIG_ENV] = config.source  # worker processes load the same file
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run("gateway.cli:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
