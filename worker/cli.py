"""``pipefleet worker``: parse arguments and pin the GPU before torch is imported."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``pipefleet worker`` argument parser."""
    parser = parser or argparse.ArgumentParser(prog="pipefleet worker")
    parser.add_argument("--config", help="fleet TOML file (default: $PIPEFLEET_CONFIG or config/fleet.toml)")
    parser.add_argument("--deployment", action="append", default=[],
                        help="serve only this deployment (repeatable; default: all in the config)")
    parser.add_argument("--gpu", help="GPU index or indices to pin (e.g. 0 or 0,1), or 'none' for the CPU")
    parser.add_argument("--concurrency", type=int,
                        help="jobs held and job threads (default: per deployment, 8 x max_batch_size where batches "
                             "are grouped by length, else 2 x; at most 512)")
    parser.add_argument("--name", help="worker name (default: pipefleet-<host>-<pid>)")
    parser.add_argument("--loglevel", default=os.environ.get("PIPEFLEET_LOGLEVEL", "INFO"))
    parser.add_argument("--log-json", action="store_true", help="structured JSON log lines")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.add_argument("--check", action="store_true",
                        help="health check: exit 0 if this worker's deployments are advertised in Redis")
    parser.add_argument("--register-only", action="store_true",
                        help="register the deployments in Redis (jobs for them queue from now on) and exit, "
                             "without loading a model: for a fleet that starts at zero workers")
    return parser


def pin_gpu(gpu: str | None) -> None:
    """Set ``CUDA_VISIBLE_DEVICES``; must run before torch is imported."""
    if gpu is None:
        return
    if "torch" in sys.modules:
        raise RuntimeError("torch was imported before the GPU was pinned")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if gpu.strip().lower() in ("none", "cpu", "") else gpu.strip()


def run(args: argparse.Namespace) -> int:
    """Run the worker described by parsed ``args``; returns the exit code."""
    pin_gpu(args.gpu)
    from worker.process import run_worker  # imports torch: only after pinning

    return run_worker(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m worker``."""
    return run(build_parser().parse_args(argv))
