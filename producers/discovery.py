"""Find deployments: the durable registrations say which exist, live advertisements say who serves them now.

A deployment is *known* while its registration (``pipefleet:deployments``)
stands, whether or not a worker runs: jobs sent to it queue until a worker
starts. A deployment that only advertises (a worker older than registrations)
is known too, while it lives.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis as redis_lib
from pydantic import ValidationError

from producers.constants import AD_KEY_PREFIX, REGISTRY_KEY
from producers.construction import ConstructionRequest, choose
from producers.errors import UnknownDeployment
from producers.schemas import DeploymentAd, DeploymentInfo, DeploymentRegistration, DeploymentTerms

logger = logging.getLogger(__name__)


def read_ads(redis: Any) -> list[DeploymentAd]:
    """Every live advertisement (one per deployment per worker)."""
    keys = list(redis.scan_iter(match=f"{AD_KEY_PREFIX}*", count=1000))
    if not keys:
        return []
    ads = []
    for raw in redis.mget(keys):
        if raw is None:
            continue
        try:
            ads.append(DeploymentAd.model_validate_json(raw))
        except ValidationError as error:
            logger.warning("ignoring a malformed advertisement: %s", error)
    return ads


def read_registrations(redis: Any) -> list[DeploymentRegistration]:
    """Every registered deployment, served now or not."""
    registrations = []
    for name, raw in sorted(redis.hgetall(REGISTRY_KEY).items()):
        try:
            registrations.append(DeploymentRegistration.model_validate_json(raw))
        except ValidationError as error:
            logger.warning("ignoring a malformed registration of %r: %s", name, error)
    return registrations


def group_ads(ads: list[DeploymentAd],
              registrations: list[DeploymentRegistration] | None = None) -> list[DeploymentInfo]:
    """One :class:`DeploymentInfo` per known deployment, listing the workers serving it now (maybe none).

    A live worker's terms win over the registration's: they are what serves jobs now.
    """
    by_name: dict[str, list[DeploymentAd]] = {}
    for ad in ads:
        by_name.setdefault(ad.name, []).append(ad)
    registered = {r.name: r for r in registrations or []}
    infos = []
    for name in sorted(set(by_name) | set(registered)):
        group = by_name.get(name, [])
        source: DeploymentTerms = max(group, key=lambda ad: ad.heartbeat_at) if group else registered[name]
        terms = source.model_dump(include=set(DeploymentTerms.model_fields))
        infos.append(DeploymentInfo(**terms, workers=sorted(ad.worker for ad in group),
                                    devices=sorted({ad.device for ad in group})))
    return infos


def read_deployments(redis: Any) -> list[DeploymentInfo]:
    """Every known deployment with the workers serving it now."""
    return group_ads(read_ads(redis), read_registrations(redis))


def _describe(infos: list[DeploymentInfo]) -> str:
    if not infos:
        return "no deployment is registered (has a worker ever run against this broker?)"
    return "known deployments: " + "; ".join(
        f"{i.name} ({i.task}, {i.model}, {len(i.workers)} live worker(s))" for i in infos)


def match_deployment(infos: list[DeploymentInfo], *, task: str | None, model: str | None,
                     deployment: str | None, revision: str | None = None,
                     construction: ConstructionRequest | None = None) -> DeploymentInfo:
    """The deployment a request names; raises :class:`UnknownDeployment` listing the known ones.

    With ``construction`` (the options of ``producers.pipeline(...)``), the
    deployment must also have been built that way; see :mod:`producers.construction`.
    """
    if deployment is not None:
        candidates = [i for i in infos if i.name == deployment]
    else:
        if task is None and model is None:
            raise UnknownDeployment("name a deployment, or a task and a model; " + _describe(infos))
        candidates = [i for i in infos
                      if (task is None or _same_task(i.task, task)) and (model is None or i.model == model)]
    if revision is not None:
        candidates = [i for i in candidates if i.revision == revision]
    if task is not None and deployment is not None:
        candidates = [i for i in candidates if _same_task(i.task, task)]
    if model is not None and deployment is not None:
        candidates = [i for i in candidates if i.model == model]
    wanted = ", ".join(f"{k}={v!r}" for k, v in
                       (("deployment", deployment), ("task", task), ("model", model), ("revision", revision))
                       if v is not None)
    if not candidates:
        raise UnknownDeployment(f"no registered deployment serves {wanted}; {_describe(infos)}")
    if len(candidates) > 1 and deployment is None and any(c.workers for c in candidates):
        # A deployment nobody serves now (stopped, scaled to zero) does not compete with a served one.
        candidates = [c for c in candidates if c.workers]
    if construction is not None:
        return choose(candidates, construction, wanted)
    if len(candidates) > 1:
        raise UnknownDeployment(
            f"several deployments match ({', '.join(c.name for c in candidates)}); pass deployment=<name>")
    return candidates[0]


_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def _same_task(served: str, asked: str) -> bool:
    return _ALIASES.get(served, served) == _ALIASES.get(asked, asked)


class DeploymentCache:
    """Registrations and advertisements read at most once per ``ttl_s``, re-read on a miss."""

    def __init__(self, redis: Any, ttl_s: float = 2.0) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._infos: list[DeploymentInfo] = []
        self._read_at = float("-inf")

    def get(self, *, fresh: bool = False) -> list[DeploymentInfo]:
        """The known deployments, from cache unless stale or ``fresh``."""
        if fresh or time.monotonic() - self._read_at > self.ttl_s:
            try:
                self._infos = read_deployments(self.redis)
            except (redis_lib.ConnectionError, redis_lib.TimeoutError) as error:
                # Through a Redis restart, submit() keeps routing by what it last saw (publishing
                # retries until Redis is back); a refused password is never papered over.
                if fresh or not self._infos or isinstance(error, redis_lib.AuthenticationError):
                    raise
                logger.warning("Redis unreachable (%s); using the deployments read %.1f s ago",
                               error, time.monotonic() - self._read_at)
                return self._infos
            self._read_at = time.monotonic()
        return self._infos

    def match(self, **request: Any) -> DeploymentInfo:
        """Resolve a request, re-reading Redis once before giving up."""
        try:
            return match_deployment(self.get(), **request)
        except UnknownDeployment:
            return match_deployment(self.get(fresh=True), **request)
