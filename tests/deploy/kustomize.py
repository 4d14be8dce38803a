"""A small kustomize renderer for ``deploy/k8s``, limited to the features those manifests use.

Why hand-written: CI has no ``kubectl`` (or ``kustomize``) binary and PyPI has no
maintained Python kustomize. The manifests use only ``resources`` (files, and
directories holding a ``kustomization.yaml``), so that is all this renders;
anything else in a kustomization (patches, generators, namespace, labels) is
refused, so a manifest change that needs more fails here instead of rendering
wrong. Where ``kubectl`` exists, the test also compares this rendering with
``kubectl kustomize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources"}
"""The kustomization fields this renderer understands."""


def render(directory: Path) -> list[dict[str, Any]]:
    """Every resource of the kustomization in ``directory``, in kustomize's order (depth first, as listed)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    if unsupported:
        raise ValueError(f"{directory}: kustomization fields this renderer does not support: {sorted(unsupported)}")
    documents: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    seen = set()
    for doc in documents:
        key = (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        if key in seen:
            raise ValueError(f"{directory}: {key} is defined twice")
        seen.add(key)
    return documents
