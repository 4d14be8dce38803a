"""``pipefleet flower``: Flower on the fleet's broker, with the fleet's Celery app, behind basic auth.

Credentials come from ``--basic-auth user:password`` (repeatable), else the
config's ``[flower] basic_auth`` (env ``PIPEFLEET_FLOWER__BASIC_AUTH='["user:pw"]'``).
Without any, Flower refuses to start unless ``--insecure`` is given. Flower's
``/metrics`` needs the same credentials as its UI and API; ``/healthcheck``
stays open for orchestrators.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from producers.errors import ConfigError

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``pipefleet flower`` argument parser."""
    parser = argparse.ArgumentParser(prog="pipefleet flower", description="Flower for the pipefleet fleet")
    parser.add_argument("--config", help="fleet TOML file (default: $PIPEFLEET_CONFIG or config/fleet.toml)")
    parser.add_argument("--address", help="listen address (default: config [flower] address)")
    parser.add_argument("--port", type=int, help="listen port (default: config [flower] port)")
    parser.add_argument("--basic-auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="credentials (repeatable; default: config [flower] basic_auth)")
    parser.add_argument("--insecure", action="store_true", help="allow running without any credentials")
    parser.add_argument("--loglevel", default=os.environ.get("PIPEFLEET_LOGLEVEL", "INFO"))
    parser.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    return parser


def credentials(args: argparse.Namespace, configured: list[str]) -> list[str]:
    """The basic-auth pairs to enforce; raises ConfigError when none and not ``--insecure``."""
    pairs = list(args.basic_auth or configured)
    malformed = [pair.split(":", 1)[0] for pair in pairs if ":" not in pair or not pair.split(":", 1)[1]]
    if malformed:
        raise ConfigError(f"basic auth must be 'user:password'; malformed entry for {', '.join(malformed)!r}")
    if not pairs and not args.insecure:
        raise ConfigError("Flower needs credentials: set [flower] basic_auth in the config, "
                          "PIPEFLEET_FLOWER__BASIC_AUTH='[\"user:password\"]', or --basic-auth user:password "
                          "(or pass --insecure to run without authentication)")
    return pairs


def _protect_metrics() -> None:
    import tornado.web
    from flower.views.monitor import Metrics

    # Flower serves /metrics without checking credentials; it names workers, queues and task counts.
    if not getattr(Metrics.get, "_pipefleet_protected", False):
        Metrics.get = tornado.web.authenticated(Metrics.get)
        Metrics.get._pipefleet_protected = True


def run(args: argparse.Namespace) -> int:
    """Start Flower; returns when it is stopped (SIGTERM or Ctrl-C)."""
    from config import load_config
    from worker.logs import configure_logging

    configure_logging(args.loglevel, json_lines=args.log_json)
    try:
        config = load_config(args.config)
        pairs = credentials(args, config.flower.basic_auth)
    except ConfigError as error:
        print(f"pipefleet flower: {error}", file=sys.stderr)
        return 2
    if not pairs:
        logger.warning("Flower runs WITHOUT authentication (--insecure)")
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"

    import flower.options  # noqa: F401  (defines Flower's tornado options)
    from flower.app import Flower
    from flower.urls import settings
    from tornado.options import options

    from worker.celery_app import configure_app

    app = configure_app(config)
    options.address = args.address or config.flower.address
    options.port = config.flower.port if args.port is None else args.port
    options.basic_auth = pairs
    options.enable_events = True
    _protect_metrics()
    flower_app = Flower(capp=app, options=options, **settings)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    port = flower_app.start_http_server()
    logger.info("Flower on http://%s:%s (broker %s, auth %s)", options.address, port,
                app.connection().as_uri(), "basic" if pairs else "OFF")
    # Workers send task events only while someone watches; Flower's own timer first asks after 5 s.
    flower_app.io_loop.add_callback(flower_app.events.on_enable_events)
    try:
        flower_app.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower_app.stop()
    return 0
