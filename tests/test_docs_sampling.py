"""docs/sampling.md runs: its Python blocks against a fleet serving ``chat`` and ``chat-static``, its TOML loads."""

from __future__ import annotations

import re

from tests.fleet import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "sampling.md"
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<mark>[^>]*?) -->\n)?```(?P<language>\w+)\n(?P<source>.*?)```", re.S)


def blocks(language: str) -> list[tuple[str | None, str]]:
    """The page's blocks in ``language``: (their docs-test mark or None, their source)."""
    return [(m["mark"], m["source"]) for m in BLOCK.finditer(PAGE.read_text()) if m["language"] == language]


def test_python_blocks_run_against_static_and_continuous_deployments(sampling_fleet):
    ran = 0
    namespace: dict = {"__name__": "docs_sampling", **sampling_fleet}
    for mark, source in blocks("python"):
        if mark and mark.startswith("static "):
            compile(source, str(PAGE), "exec")  # cannot run here (the mark says why); it must still compile
            continue
        exec(compile(source, str(PAGE), "exec"), namespace)
        ran += 1
    assert ran >= 2


def test_toml_blocks_load_through_the_fleet_loader(tmp_path):
    from config.loader import load_config

    for index, (_, source) in enumerate(blocks("toml")):
        path = tmp_path / f"block{index}.toml"
        path.write_text(source)
        config = load_config(path, environ={})
        assert config.deployments
