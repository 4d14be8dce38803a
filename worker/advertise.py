"""Register and advertise this worker's deployments in Redis; a heartbeat thread refreshes the advertisements.

Two records per deployment:

- the *registration* (a field of the hash ``pipefleet:deployments``): the
  deployment's terms and construction facts, written at start and kept after
  the worker stops, so producers keep accepting jobs for it while no worker
  runs (a restart, a scale to zero);
- the *advertisement* (``pipefleet:ad:<deployment>:<worker>``): who serves it
  now; it expires ``HEARTBEAT_TTL_S`` after its last refresh, so a dead worker
  disappears.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from producers.constants import AD_KEY_PREFIX, HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, REGISTRY_KEY
from producers.schemas import DeploymentAd, DeploymentRegistration, DeploymentTerms

logger = logging.getLogger(__name__)


def ad_key(deployment: str, worker: str) -> str:
    """The Redis key of one deployment's advertisement by one worker."""
    return f"{AD_KEY_PREFIX}{deployment}:{worker}"


def registration_of(terms: DeploymentTerms, registered_by: str) -> DeploymentRegistration:
    """The durable registration of the deployment these terms describe."""
    return DeploymentRegistration(**terms.model_dump(include=set(DeploymentTerms.model_fields)),
                                  registered_by=registered_by)


def register(redis: Any, registrations: list[DeploymentRegistration]) -> None:
    """Write (or overwrite) these registrations in one round trip."""
    if registrations:
        redis.hset(REGISTRY_KEY, mapping={r.name: r.model_dump_json() for r in registrations})


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
        """Write every advertisement once, with a fresh TTL, and any registration that went missing.

        The first beat overwrites the registrations (this worker's construction
        facts are the newest); later beats only restore one that vanished (a
        Redis flushed or failed over without it), never fight a newer worker's.
        """
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        keys = []
        for ad in self.make_ads():
            ad.heartbeat_at = now
            keys.append(ad_key(ad.name, ad.worker))
            pipe.set(keys[-1], ad.model_dump_json(), ex=self.ttl_s)
            registration = registration_of(ad, ad.worker).model_dump_json()
            if self._keys:
                pipe.hsetnx(REGISTRY_KEY, ad.name, registration)
            else:
                pipe.hset(REGISTRY_KEY, ad.name, registration)
        pipe.execute()
        self._keys = keys

    def start(self) -> None:
        """Advertise now, then keep refreshing in the background."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing and withdraw the advertisements (the registrations stay)."""
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
