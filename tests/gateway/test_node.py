"""A Node.js backend (built-in ``fetch``, no packages) submits, polls and reads a job through the gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.gateway.conftest import API_KEY
from tests.oracle import assert_same, local_pipeline

NODE = shutil.which("node")
SCRIPT = Path(__file__).with_name("node_client.mjs")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def test_node_fetch_submits_polls_and_reads_the_result(gateway, models):
    texts = ["I love this film", "terrible service"]
    env = dict(os.environ, GATEWAY_URL=gateway.url, API_KEY=API_KEY)
    done = subprocess.run([NODE, str(SCRIPT), "gw-slow", json.dumps(texts)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["states"][-1] == "SUCCESS"
    assert_same(report["result"], local_pipeline("text-classification", models["gw-slow"])(texts))
