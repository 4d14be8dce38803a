"""Every fenced code block of ``README.md`` and ``docs/**/*.md`` runs here, one test per page.

The convention (what each language does, the ``<!-- docs-test: ... -->`` marks, what the docs fleet serves) is
written for page authors in ``docs/development.md``, "Runnable documentation". In short: Python blocks run
against one module fleet (a worker serving :data:`DEPLOYMENTS` and a gateway), in one namespace per page; TOML
loads through the fleet loader; shell and console blocks run in bash against the same fleet; JSON parses; any
other block fails unless a mark says why it cannot run, and then it is still checked statically.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import REPO_ROOT
from tests.gateway.server import start_gateway
from tests.tasks.private_models import private_models

API_KEY = "docs-key-0123456789abcdef"
"""The docs gateway's one API key, ``$KEY`` in the blocks."""

#: deployment -> (task, tiny model kind): what the docs fleet serves.
DEPLOYMENTS = {
    "sentiment": ("text-classification", "text-classification"),
    "embeddings": ("feature-extraction", "feature-extraction"),
    "llm": ("text-generation", "text-generation"),
}

#: hub id written in the docs -> the deployment whose tiny model stands in for it.
STAND_INS = {
    "distilbert/distilbert-base-uncased-finetuned-sst-2-english": "sentiment",
    "sentence-transformers/all-MiniLM-L6-v2": "embeddings",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "llm",
}

PAGES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md")])

#: Pages other branches are writing; links to them may dangle until they are merged.
PENDING_PAGES = {"ownership.md", "batches.md", "webhooks.md", "production.md", "sampling.md", "quantization.md"}

SHELLS = {"bash", "sh", "shell"}
#: Other spellings of the languages the test runs.
ALIASES = {"py": "python", "python3": "python", "shell-session": "console", "jsonl": "json", "yml": "yaml"}
#: Languages a block is run or loaded in; ``not-code`` is for the others.
RUNNABLE = {"python", "toml", "json", "yaml", "console", *SHELLS}
MARK = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
PAGE_MARK = re.compile(r"^<!--\s*docs-test-page:\s*(.*?)\s*-->\s*$")
PAGE_MARKS = {"tested-by", "fixture"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)(.*)$")
STATIC_MARKS = {"static", "not-code"}

SHELL_PRELUDE = """
pipefleet() { "$PIPEFLEET_PYTHON" -m producers.cli "$@"; }
curl() { command curl --fail-with-body --max-time 120 "$@"; }
"""


@dataclass
class Block:
    """One fenced block: where it is, its language, its text and the marks before it."""

    page: Path
    line: int
    language: str
    source: str
    marks: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        page = self.page.relative_to(REPO_ROOT) if self.page.is_relative_to(REPO_ROOT) else self.page.name
        return f"{page}:{self.line}"

    def mark(self, name: str) -> str | None:
        """The argument of mark ``name`` (``""`` if it has none), or None when absent."""
        for mark in self.marks:
            head, _, rest = mark.partition(" ")
            key, equals, value = head.partition("=")
            if key == name:
                return value if equals else rest.strip()
        return None


def parse_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page; a mark not followed by a block is an error."""
    blocks, marks, page_marks = [], [], []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines) and (not lines[index].strip() or PAGE_MARK.match(lines[index].strip())):
        if lines[index].strip():
            page_marks.append(PAGE_MARK.match(lines[index].strip()).group(1))
        index += 1
    for mark in page_marks:
        assert mark.partition("=")[0] in PAGE_MARKS, f"{page.name}: a page mark is one of {PAGE_MARKS}, not {mark!r}"
    while index < len(lines):
        line = lines[index]
        if PAGE_MARK.match(line.strip()):
            raise AssertionError(f"{page.name}:{index + 1}: docs-test-page marks go at the very top of the page")
        mark = MARK.match(line.strip())
        fence = FENCE.match(line)
        if mark:
            marks.append(mark.group(1))
        elif fence:
            closing = fence.group(1)
            end = index + 1
            while end < len(lines) and not lines[end].strip().startswith(closing):
                end += 1
            if end == len(lines):
                raise AssertionError(f"{page.name}:{index + 1}: the block is never closed")
            language = fence.group(2).lower()
            if "no-run" in fence.group(3).split():  # the helpers' brief's spelling of a static block
                marks.append("static marked no-run in its info string")
            source = textwrap.dedent("\n".join(lines[index + 1:end])) + "\n"  # blocks inside list items
            blocks.append(Block(page, index + 1, ALIASES.get(language, language), source, page_marks + marks))
            marks = []
            index = end
        elif marks and line.strip():
            raise AssertionError(f"{page.name}:{index + 1}: docs-test marks {marks} are not right before a block")
        index += 1
    if marks:
        raise AssertionError(f"{page.name}: docs-test marks {marks} at the end of the page, before no block")
    return blocks


def check_marks(block: Block) -> None:
    """Every mark is one of the convention's, with its reason where one is required."""
    for mark in block.marks:
        head, _, rest = mark.partition(" ")
        key = head.partition("=")[0]
        if key in STATIC_MARKS:
            assert len(rest.split()) >= 3, f"{block.where}: '{key}' needs a reason of a few words, got {rest!r}"
        elif key in ("fixture", "tested-by"):
            assert head.partition("=")[2], f"{block.where}: '{key}=' names nothing"
        elif key != "error-tree":
            raise AssertionError(f"{block.where}: unknown docs-test mark {mark!r} (see docs/development.md)")


# --- the docs fleet -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs_models(module_fleet, model_dir, tmp_path_factory) -> dict[str, str]:
    """deployment -> tiny model path, once one worker serves them all."""
    paths = private_models(model_dir, tmp_path_factory.mktemp("models-docs"),
                           {name: kind for name, (_, kind) in DEPLOYMENTS.items()})
    config = module_fleet.config(
        [{"name": name, "task": task, "model": paths[name], "max_batch_size": 16}
         for name, (task, _) in DEPLOYMENTS.items()],
        gateway={"api_keys": [API_KEY]})
    module_fleet.worker(config, deployments=list(DEPLOYMENTS))
    module_fleet.docs_config = config
    return paths


@pytest.fixture(scope="module")
def docs_env(docs_models, module_fleet, tmp_path_factory) -> dict[str, str]:
    """What every block sees in its environment: the fleet, the gateway, a finished job's id."""
    gateway = start_gateway(module_fleet.docs_config, tmp_path_factory.mktemp("docs-gateway"))
    with module_fleet.client() as client:
        job = client.submit(deployment="sentiment", inputs="a finished job")
        job.result(timeout=120)
    yield {"PIPEFLEET_BROKER_URL": module_fleet.broker_url, "PIPEFLEET_RESULT_BACKEND": module_fleet.result_backend,
           "URL": gateway.url, "KEY": API_KEY, "ID": job.id,
           "OPENAI_BASE_URL": f"{gateway.url}/v1", "OPENAI_API_KEY": API_KEY}
    gateway.stop()


def stand_in(source: str, models: dict[str, str]) -> str:
    """Replace each documented hub id by the path of its stand-in tiny model."""
    for hub_id, deployment in STAND_INS.items():
        source = source.replace(hub_id, models[deployment])
    return source


# --- running blocks -------------------------------------------------------------------------------------------


class Page:
    """The state one page's blocks share: namespace, event loop, working directory, environment."""

    def __init__(self, directory: Path, env: dict[str, str], models: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.models = models
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.loop = asyncio.new_event_loop()

    def run_python(self, block: Block) -> None:
        code = compile(stand_in(block.source, self.models), block.where, "exec",
                       flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        outcome = eval(code, self.namespace)  # noqa: S307 - the documentation's own code, by design
        if inspect.iscoroutine(outcome):
            self.loop.run_until_complete(outcome)

    def run_shell(self, source: str, block: Block) -> None:
        env = {**os.environ, **self.env, "PIPEFLEET_PYTHON": sys.executable,
               "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        script = SHELL_PRELUDE + stand_in(source, self.models)
        run = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", script], cwd=self.directory, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (f"{block.where}: exit {run.returncode}\n--- script\n{source}"
                                     f"--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}")

    def close(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def console_commands(source: str) -> str:
    """The ``$ `` lines of a console block and their ``\\`` continuations, as one script."""
    commands, continuing = [], False
    for line in source.splitlines():
        if continuing or line.startswith("$ "):
            commands.append(line[2:] if not continuing else line)
            continuing = line.rstrip().endswith("\\")
    assert commands, "a console block with no '$ ' command line"
    return "\n".join(commands) + "\n"


def load_toml(block: Block, directory: Path) -> None:
    from config.loader import load_config

    path = directory / f"block-{block.line}.toml"
    path.write_text(block.source)
    load_config(path, environ={})


def load_json(block: Block) -> None:
    try:
        json.loads(block.source)
    except json.JSONDecodeError:
        for line in block.source.splitlines():
            if line.strip():
                json.loads(line)


def load_yaml(block: Block) -> None:
    import yaml

    list(yaml.safe_load_all(block.source))


def check_tested_by(block: Block, test_path: str) -> None:
    """The named test reads this page, or holds every line of the block's code."""
    path = REPO_ROOT / test_path
    assert path.is_file(), f"{block.where}: tested-by names {test_path}, which does not exist"
    text = path.read_text()
    if block.page.name in text:
        return
    code = [line.strip() for line in block.source.splitlines() if line.strip() and not line.strip().startswith("#")]
    missing = [line for line in code if line not in text]
    assert not missing, (f"{block.where}: {test_path} neither names {block.page.name} nor holds these lines of "
                         f"the block: {missing[:5]}")


def check_error_tree(block: Block) -> None:
    """Each class is a direct subclass of its parent in ``producers.errors``; none is missing."""
    from producers import errors

    parents: list[type] = []
    seen = set()
    for line in block.source.splitlines():
        match = re.search(r"[A-Za-z_]\w*", line)
        if not match:
            continue
        depth = match.start() // 4
        cls = getattr(errors, match.group(0), None)
        assert isinstance(cls, type) and issubclass(cls, Exception), f"{block.where}: no error {match.group(0)}"
        if depth:
            assert parents[depth - 1] in cls.__bases__, f"{block.where}: {cls.__name__} is not a {parents[depth - 1]}"
        parents[depth:] = [cls]
        seen.add(cls)
    every = {cls for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.PipefleetError)}
    assert every <= seen, f"{block.where}: the tree lacks {sorted(c.__name__ for c in every - seen)}"


def check_shell_statically(source: str, block: Block) -> None:
    """Parse each ``pipefleet`` command with its verb's parser; ``python -m`` and ``bash`` targets exist."""

    logical = re.sub(r"\\\n", " ", source)
    for line in logical.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
        commands, current = [], []
        for word in words:
            if word in {"&&", "||", "|", ";", "&", "(", ")", "$("}:
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
        for command in commands:
            while command and re.match(r"^[A-Za-z_]\w*=", command[0]):
                command = command[1:]
            if not command:
                continue
            program = Path(command[0]).name
            if program == "pipefleet":
                check_pipefleet_args(command[1:], block)
            elif program.startswith("python") and command[1:2] == ["-m"]:
                module = command[2]
                assert (REPO_ROOT / (module.replace(".", "/") + ".py")).exists() or \
                    (REPO_ROOT / module.replace(".", "/") / "__init__.py").exists(), \
                    f"{block.where}: no module {module} in the repository"
            elif program == "bash":
                assert (REPO_ROOT / command[1]).exists(), f"{block.where}: no script {command[1]}"


def check_pipefleet_args(args: list[str], block: Block) -> None:
    """Parse ``pipefleet ARGS`` as ``main()`` would, with the verb's own parser."""
    from producers.cli import build_parser, server_parser

    verb = next((a for a in args if not a.startswith("-")), None)
    parser = server_parser(verb) if verb else None
    rest = args[args.index(verb) + 1:] if parser else args
    parser = parser or build_parser()
    try:
        parser.parse_args(rest)
    except SystemExit as error:
        raise AssertionError(f"{block.where}: 'pipefleet {' '.join(args)}' does not parse") from error


def run_block(block: Block, page: Page, request: pytest.FixtureRequest) -> None:
    """Run or check one block as its language and marks say."""
    check_marks(block)
    fixture = block.mark("fixture")
    if fixture:
        provided = request.getfixturevalue(fixture)
        assert isinstance(provided, dict), f"{block.where}: fixture {fixture} must return a dict"
        page.namespace.update(provided)
        page.env.update({k: v for k, v in provided.items() if isinstance(v, str)})
    language = block.language
    tested_by = block.mark("tested-by")
    if tested_by:
        check_tested_by(block, tested_by)
        if language == "python":
            compile(block.source, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            return
    if block.mark("error-tree") is not None:
        check_error_tree(block)
    elif language == "toml":
        load_toml(block, page.directory)
    elif language == "json":
        load_json(block)
    elif language == "yaml":
        load_yaml(block)
    elif block.mark("not-code") is not None:
        assert language not in RUNNABLE, f"{block.where}: a {language} block is code; run it or mark it static"
    elif block.mark("static") is not None:
        if language == "python":
            compile(block.source, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        elif language in SHELLS:
            check_shell_statically(block.source, block)
        elif language == "console":
            check_shell_statically(console_commands(block.source), block)
        else:
            raise AssertionError(f"{block.where}: no static check for a {language or 'plain'} block")
    elif language == "python":
        page.run_python(block)
    elif language in SHELLS:
        page.run_shell(block.source, block)
    elif language == "console":
        page.run_shell(console_commands(block.source), block)
    else:
        raise AssertionError(f"{block.where}: a {language or 'plain'} block neither runs nor carries a docs-test "
                             "mark saying why (see docs/development.md, 'Runnable documentation')")


@pytest.mark.parametrize("page_path", PAGES, ids=[str(p.relative_to(REPO_ROOT)) for p in PAGES])
def test_every_block_of_the_page_runs(page_path, docs_env, docs_models, tmp_path, monkeypatch, request):
    blocks = parse_blocks(page_path)
    monkeypatch.chdir(tmp_path)
    for name, value in docs_env.items():
        monkeypatch.setenv(name, value)
    page = Page(tmp_path, dict(docs_env), docs_models)
    try:
        for block in blocks:
            try:
                run_block(block, page, request)
            except AssertionError:
                raise
            except BaseException as error:
                raise AssertionError(f"{block.where}: the {block.language} block raised "
                                     f"{type(error).__name__}: {error}\n{block.source}") from error
    finally:
        page.close()


# --- the convention itself, without a fleet -------------------------------------------------------------------


def test_a_block_without_a_way_to_run_fails_loudly(tmp_path):
    page = tmp_path / "new.md"
    page.write_text("# New\n\n```js\nconsole.log(1)\n```\n")
    (block,) = parse_blocks(page)
    with pytest.raises(AssertionError, match="neither runs nor carries a docs-test mark"):
        run_block(block, Page(tmp_path, {}, {}), request=None)


def test_marks_need_reasons_and_a_block(tmp_path):
    page = tmp_path / "new.md"
    page.write_text("<!-- docs-test: static -->\n```bash\npipefleet worker --gpu 0\n```\n")
    (block,) = parse_blocks(page)
    with pytest.raises(AssertionError, match="needs a reason"):
        check_marks(block)
    page.write_text("<!-- docs-test: skip it -->\n```bash\ntrue\n```\n")
    with pytest.raises(AssertionError, match="unknown docs-test mark"):
        check_marks(parse_blocks(page)[0])
    page.write_text("<!-- docs-test: static needs a GPU here -->\n\nSome text.\n\n```bash\ntrue\n```\n")
    with pytest.raises(AssertionError, match="not right before a block"):
        parse_blocks(page)


def test_indented_blocks_and_no_run_info_strings_are_found(tmp_path):
    page = tmp_path / "new.md"
    page.write_text("- a step:\n\n  ```py\n  x = 1\n  ```\n\n```python no-run\nimport kubernetes\n```\n")
    first, second = parse_blocks(page)
    assert (first.language, first.source, first.marks) == ("python", "x = 1\n", [])
    assert second.mark("static") == "marked no-run in its info string"
    run_block(second, Page(tmp_path, {}, {}), request=None)  # compiled, not run


def test_a_page_tested_elsewhere_names_a_test_that_runs_its_blocks(tmp_path):
    mark = "<!-- docs-test-page: tested-by=tests/test_layers.py -->\n# Elsewhere\n\n"
    page = tmp_path / "elsewhere.md"
    page.write_text(mark + '```python\nPACKAGES = ["producers", "config", "worker", "tasks", "gateway"]\n```\n')
    (block,) = parse_blocks(page)
    assert block.mark("tested-by") == "tests/test_layers.py"
    run_block(block, Page(tmp_path, {}, {}), request=None)  # that test holds the line; compiled, not run
    page.write_text(mark + "```python\nprint('a line no test holds')\n```\n")
    with pytest.raises(AssertionError, match="neither names elsewhere.md nor holds"):
        run_block(parse_blocks(page)[0], Page(tmp_path, {}, {}), request=None)


def test_static_shell_blocks_are_parsed_by_the_cli(tmp_path):
    page = tmp_path / "new.md"
    page.write_text("<!-- docs-test: static starts a server here -->\n```bash\npipefleet submit --no-such-flag\n```\n")
    (block,) = parse_blocks(page)
    with pytest.raises(AssertionError, match="does not parse"):
        run_block(block, Page(tmp_path, {}, {}), request=None)


def _anchors(page: Path) -> set[str]:
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                if resolved.name not in PENDING_PAGES:
                    broken.append(f"{page.relative_to(REPO_ROOT)}: {target}")
                continue
            if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(REPO_ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_page_is_in_the_index():
    index = (REPO_ROOT / "docs" / "index.md").read_text()
    missing = [p.name for p in (REPO_ROOT / "docs").glob("*.md") if p.name != "index.md" and f"({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


def test_the_readme_stays_a_front_door():
    lines = (REPO_ROOT / "README.md").read_text().count("\n")
    assert lines < 250, f"README.md has {lines} lines; move reference material to docs/"


def test_pages_are_found():
    assert {p.name for p in PAGES} >= {"README.md", "index.md", "architecture.md", "client.md"}
    assert shutil.which("bash") and shutil.which("curl"), "the shell blocks need bash and curl"


def test_a_fixture_mark_requests_that_fixture(tmp_path, request):
    page = tmp_path / "new.md"
    page.write_text("<!-- docs-test: fixture=tmp_path -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="fixture tmp_path must return a dict"):
        run_block(parse_blocks(page)[0], Page(tmp_path, {}, {}), request)
