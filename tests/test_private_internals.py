"""Private names of libraries are used only in their one pinned module; private helpers stay in their module.

An attribute ``x._name`` (or ``getattr(x, "_name")``) where ``x`` is not ``self``/``cls`` is allowed when
``_name`` is defined in the same module (a class's own private, an override's ``super()`` call, a marker the
module sets). Anywhere else it reaches into another module or a library: that belongs in the library's
``*_internals`` module, whose test pins it to the installed version.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.fleet import REPO_ROOT

PACKAGES = ("config", "producers", "worker", "tasks", "gateway")
#: The one module per library allowed to use its private names, and the test that pins it.
PINNED = {
    "producers/celery_internals.py": "tests/producers/test_celery_internals.py",
    "producers/redis_internals.py": "tests/producers/test_redis_internals.py",
    "worker/transformers_internals.py": "tests/worker/test_transformers_internals.py",
    "worker/kombu_layout.py": "tests/worker/test_kombu_layout.py",
}


PUBLIC_UNDERSCORED = {"_exit"}
"""Documented public names that start with an underscore (``os._exit``)."""


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORED


def _defined_here(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if _private(name)}


def private_uses(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """``file:line: expression`` for each use of a private name not defined in the file (path relative to root)."""
    tree = ast.parse(path.read_text())
    own = _defined_here(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value) and node.args[1].value not in own):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names if _private(a.name)]
    relative = path.relative_to(root)
    return [f"{relative}:{line}: {expression}" for line, expression in sorted(found)]


def test_private_names_are_used_only_in_their_pinned_modules():
    uses = [use for package in PACKAGES for path in sorted((REPO_ROOT / package).rglob("*.py"))
            if str(path.relative_to(REPO_ROOT)) not in PINNED for use in private_uses(path)]
    assert not uses, "private names of other modules or libraries (move them into a pinned module):\n" + \
        "\n".join(uses)


def test_every_pinned_module_has_its_pinning_test():
    for module, test in PINNED.items():
        assert (REPO_ROOT / test).is_file(), f"{module} is pinned by {test}, which does not exist"
        assert Path(module).stem in (REPO_ROOT / test).read_text(), f"{test} does not test {module}"


def test_the_scan_finds_what_it_should(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "class A:\n"
        "    def _own(self):\n"
        "        return self._x\n"
        "def f(pipe, other: A):\n"
        "    other._own()\n"
        "    getattr(pipe, '_generation_defaults', None)\n"
        "    return pipe._sanitize_parameters()\n"
        "from worker.loading import _import_class\n")
    uses = [use.split(": ", 1)[1] for use in private_uses(source, tmp_path)]
    assert uses == ["getattr(pipe, '_generation_defaults', None)", "pipe._sanitize_parameters",
                    "from worker.loading import _import_class"]

