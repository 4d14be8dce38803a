"""Every ``python`` block of docs/batches.md and docs/webhooks.md runs against the batch fleet; TOML blocks load."""

from __future__ import annotations

import re
import threading
import time
import tomllib
from pathlib import Path

import httpx
import uvicorn

from config.models import BatchSettings, WebhookSettings
from tests.fleet import REPO_ROOT, free_port
from tests.gateway.conftest import API_KEY, SECRET

DOCS = REPO_ROOT / "docs"
_BLOCK = re.compile(r"^```(\w[\w -]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: str, kind: str) -> list[str]:
    """The code blocks of ``page`` whose info string is exactly ``kind``."""
    return [body for info, body in _BLOCK.findall((DOCS / page).read_text()) if info.strip() == kind]


def test_every_python_block_is_run_or_says_why_not():
    for page in ("batches.md", "webhooks.md"):
        text = (DOCS / page).read_text()
        for info, _ in _BLOCK.findall(text):
            assert info.strip() in ("python", "python no-run", "toml", "json", "text", ""), (page, info)


def test_the_toml_tables_are_valid_config():
    [batches] = blocks("batches.md", "toml")
    BatchSettings(**tomllib.loads(batches)["batches"])
    [webhooks] = blocks("webhooks.md", "toml")
    WebhookSettings(**tomllib.loads(webhooks)["webhooks"])


def test_the_sdk_example_runs_a_batch(batch_gateway, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_BASE_URL", f"{batch_gateway.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    [code] = blocks("batches.md", "python")
    exec(compile(code.replace('"minilm"', '"bt-emb"'), "docs/batches.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["doc-0", "doc-1"]


def test_the_receiver_example_verifies_a_real_delivery(batch_gateway, monkeypatch):
    monkeypatch.setenv("PIPEFLEET_WEBHOOK_SECRET", SECRET)
    [code] = blocks("webhooks.md", "python")
    namespace: dict = {}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(namespace["app"], host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        response = httpx.post(f"{batch_gateway.url}/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"deployment": "bt-emb", "inputs": "hello",
                                    "webhook": f"http://127.0.0.1:{port}/hooks/pipefleet"})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 30
        while not namespace["received"] and time.monotonic() < deadline:
            time.sleep(0.05)
        [event] = namespace["received"]
        assert event["type"] == "job.succeeded" and event["data"]["id"] == response.json()["id"]
        forged = httpx.post(f"http://127.0.0.1:{port}/hooks/pipefleet", content=b'{"id": "evt_x"}',
                            headers={"webhook-id": "evt_x", "webhook-timestamp": str(int(time.time())),
                                     "webhook-signature": "v1,AAAA"})
        assert forged.status_code == 400
    finally:
        server.should_exit = True
        thread.join(10)
