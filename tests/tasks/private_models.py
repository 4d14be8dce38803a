"""Module-private copies of the session's tiny models.

Clients that name a deployment by ``(task, model)`` must find exactly one. A
killed worker's advertisement lives on for a few seconds, so two modules that
deploy the same model path back to back would make such a lookup ambiguous;
each module deploys its own copy instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable


def private_models(model_dir: Callable[[str], Path], directory: Path, kinds: dict[str, str]) -> dict[str, str]:
    """``{name: kind}`` -> ``{name: path}``: one copy of each kind's model under ``directory``."""
    copies: dict[str, str] = {}
    paths = {}
    for name, kind in kinds.items():
        if kind not in copies:
            target = directory / kind
            shutil.copytree(model_dir(kind), target)
            copies[kind] = str(target)
        paths[name] = copies[kind]
    return paths
