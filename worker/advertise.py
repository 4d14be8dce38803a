"""Advertise this worker's deployments in Redis, refreshed by a heartbeat thread.

Clients discover deployments by scanning ``pipefleet:ad:*``; an entry expires
``HEARTBEAT_TTL_S`` after its last refresh, so a dead worker disappears.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from producers.constants import AD_KEY_PREFIX, HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S
from producers.schemas import DeploymentAd

logger = logging.getLogger(__name__)


def ad_key(deployment: str, worker: str) -> str:
    """The Redis key of one deployment's advertisement by one worker."""
    return f"{AD_KEY_PREFIX}{deployment}:{worker}"


class Advertiser:
    """Writes a :class:`DeploymentAd` per deployment every ``interval_s`` until stopped."""

    def __init__(self, redis: Any, make_ads: Callable[[], list[DeploymentAd]], *,
                 interval_s: float = HEARTBEAT_INTERVAL_S, ttl_s: int = HEARTBEAT_TTL_S) -> None:
        self.redis = redis
        self.make_ads = make_ads
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._keys: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pipefleet-heartbeat", daemon=True)

    def beat(self) -> None:
        """Write every advertisement once, with a fresh TTL."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        keys = []
        for ad in self.make_ads():
            ad.heartbeat_at = now
            keys.append(ad_key(ad.name, ad.worker))
            pipe.set(keys[-1], ad.model_dump_json(), ex=self.ttl_s)
        pipe.execute()
        self._keys = keys

    def start(self) -> None:
        """Advertise now, then keep refreshing in the background."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and withdraw the advertisements."""
        self._stop.set()
        try:
            if self._keys:
                self.redis.delete(*self._keys)
        except Exception as error:  # Redis may be gone at shutdown; the TTL cleans up
            logger.warning("could not withdraw advertisements: %s", error)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception as error:  # keep beating through Redis restarts
                logger.warning("heartbeat failed: %s", error)
