"""The import layers of the design card, kept by import-linter's contracts in ``pyproject.toml``.

``producers`` ← ``config`` ← ``worker`` ← ``tasks``; the gateway on ``producers`` only; ``import producers``
never reaching torch, transformers, worker, tasks or config. No module of ``worker`` imports ``tasks``: Celery
imports the task modules itself when a worker starts (``worker.celery_app.TASK_MODULES``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.fleet import REPO_ROOT

PACKAGES = ["producers", "config", "worker", "tasks", "gateway"]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the packages under ``root`` with its ``pyproject.toml``."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                           " sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_are_kept():
    run = lint_imports(REPO_ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout, run.stdout


def test_the_worker_registers_the_tasks_without_importing_them(tmp_path):
    """A fresh interpreter: configuring the app imports no task module; Celery's worker start registers them all."""
    script = (
        "import sys\n"
        "from config.models import FleetConfig\n"
        "from worker.celery_app import TASK_MODULES, app, configure_app\n"
        "configure_app(FleetConfig(deployments=[]))\n"
        "assert not any(m in sys.modules for m in TASK_MODULES), sorted(m for m in sys.modules if m.startswith('tasks'))\n"
        "app.loader.init_worker()\n"
        "from producers.constants import ASSEMBLE_TASK, FORWARD_TASK, INFER_TASK, SPLIT_TASK\n"
        "missing = {INFER_TASK, SPLIT_TASK, FORWARD_TASK, ASSEMBLE_TASK} - set(app.tasks)\n"
        "assert not missing, missing\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_new_upward_import_breaks_the_contract(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "worker" / "batcher.py", "a") as module:
        module.write("\nfrom tasks import infer  # noqa: E402\n")
    with open(tmp_path / "producers" / "fleet.py", "a") as module:
        module.write("\nimport torch  # noqa: E402\n")
    run = lint_imports(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "worker.batcher -> tasks.infer" in run.stdout, run.stdout
    assert "producers.fleet -> torch" in run.stdout, run.stdout
    assert "Layers: tasks above worker above config above producers BROKEN" in run.stdout, run.stdout
    assert "import producers stays light: no torch, transformers, worker, tasks or config BROKEN" in run.stdout
