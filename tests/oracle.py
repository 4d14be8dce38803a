"""The equivalence oracle: fleet output against in-process ``transformers.pipeline``."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

FLOAT_TOLERANCE = 1e-4


def assert_same(fleet: Any, local: Any, *, tol: float = FLOAT_TOLERANCE, path: str = "result") -> None:
    """Assert two pipeline outputs are equal: same structure and types, floats within ``tol``."""
    import numpy

    if isinstance(local, numpy.ndarray) or hasattr(local, "detach"):
        local = numpy.asarray(local.detach().cpu() if hasattr(local, "detach") else local)
        assert numpy.allclose(numpy.asarray(fleet), local, atol=tol), f"{path}: arrays differ"
        return
    if isinstance(local, (numpy.floating, numpy.integer)):
        local = local.item()
    if isinstance(local, float):
        assert isinstance(fleet, (float, int)), f"{path}: {fleet!r} is not a number"
        assert math.isclose(fleet, local, abs_tol=tol, rel_tol=tol), f"{path}: {fleet} != {local}"
        return
    if isinstance(local, dict):
        assert isinstance(fleet, dict), f"{path}: {type(fleet).__name__} is not a dict"
        assert set(fleet) == set(local), f"{path}: keys {sorted(fleet)} != {sorted(local)}"
        for key in local:
            assert_same(fleet[key], local[key], tol=tol, path=f"{path}[{key!r}]")
        return
    if isinstance(local, (list, tuple)):
        assert type(fleet) is type(local), f"{path}: {type(fleet).__name__} is not {type(local).__name__}"
        assert len(fleet) == len(local), f"{path}: length {len(fleet)} != {len(local)}"
        for index, (a, b) in enumerate(zip(fleet, local)):
            assert_same(a, b, tol=tol, path=f"{path}[{index}]")
        return
    assert fleet == local, f"{path}: {fleet!r} != {local!r}"


@lru_cache(maxsize=None)
def local_pipeline(task: str, model: str, **kwargs: Any):
    """The in-process pipeline, loaded once per (task, model)."""
    from transformers import pipeline

    from worker.pipelines import register_all

    register_all()
    return pipeline(task, model=model, **kwargs)


def run_job(client: Any, deployment: str, inputs: Any, params: dict[str, Any] | None = None) -> Any:
    """Submit one job to ``deployment`` and wait for its result."""
    return client.submit(deployment=deployment, inputs=inputs, params=params or {}).result(timeout=120)


def case_id(case: tuple[str, Any, dict[str, Any]]) -> str:
    """A readable pytest id for a ``(deployment, inputs, params)`` case."""
    name, inputs, params = case
    shape = "list" if isinstance(inputs, list) else "single"
    return f"{name}-{shape}-{'-'.join(sorted(params)) or 'default'}"
