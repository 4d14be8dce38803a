"""``pipefleet worker --check``: is a worker on this host serving its deployments?"""

from __future__ import annotations

import json
import socket
import sys

import redis as redis_lib

from config import FleetConfig
from producers.constants import AD_KEY_PREFIX
from producers.redis_clients import redis_client


def check(config: FleetConfig, names: list[str], worker_name: str | None = None) -> int:
    """Exit code 0 when every deployment in ``names`` is advertised by a worker on this host."""
    host = socket.gethostname()
    try:
        client = redis_client(config.broker_url, config.redis_options(), socket_timeout=5)
        keys = [k.decode() for k in client.scan_iter(match=f"{AD_KEY_PREFIX}*", count=500)]
    except redis_lib.RedisError as error:
        print(f"unhealthy: cannot reach Redis: {error}", file=sys.stderr)
        return 1
    missing = []
    stalled: set[str] = set()
    for name in names:
        mine = [k for k in keys if k.startswith(f"{AD_KEY_PREFIX}{name}:")
                and (worker_name or f"-{host}-") in k[len(f"{AD_KEY_PREFIX}{name}:"):]]
        if not mine:
            missing.append(name)
        for raw in client.mget(mine) if mine else []:
            ad = json.loads(raw) if raw else {}
            if ad.get("healthy") is False:
                stalled.update(f"{ad.get('worker')}: {thread}" for thread in ad.get("stalled") or ["?"])
    if missing:
        print(f"unhealthy: no live advertisement from this host for {', '.join(missing)}", file=sys.stderr)
        return 1
    if stalled:
        print(f"unhealthy: stalled threads ({', '.join(sorted(stalled))})", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(names)} advertised from {host}")
    return 0
