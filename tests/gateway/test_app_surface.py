"""The gateway stays light (no torch, no worker code) and serves exactly the documented routes."""

from __future__ import annotations

import subprocess
import sys

from tests.fleet import REPO_ROOT

ROUTES = {
    ("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/jobs/{job_id}/result"), ("GET", "/v1/jobs/{job_id}/events"), ("DELETE", "/v1/jobs/{job_id}"),
    ("GET", "/v1/deployments"), ("GET", "/v1/models"), ("POST", "/v1/embeddings"), ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"), ("GET", "/openapi.json"), ("GET", "/docs"),
    ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"), ("GET", "/v1/files/{file_id}/content"),
    ("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/batches"), ("GET", "/v1/batches"),
    ("GET", "/v1/batches/{batch_id}"), ("POST", "/v1/batches/{batch_id}/cancel"),
}


def test_the_gateway_never_imports_torch_transformers_or_the_worker():
    code = ("import sys, gateway, gateway.cli, gateway.app; "
            "print(sorted(m for m in ('torch', 'transformers', 'worker', 'tasks', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_routes_are_exactly_the_documented_ones():
    from config.models import FleetConfig
    from gateway import create_app

    app = create_app(FleetConfig())
    served = {(method, route.path) for route in app.routes for method in getattr(route, "methods", ()) or ()
              if method != "HEAD"}
    assert served == ROUTES
    documented = "\n".join(page.read_text() for page in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])
    for method, path in ROUTES:
        assert f"{method} {path}" in documented, f"neither README nor docs/ document {method} {path}"


def test_a_keyless_gateway_listens_only_on_loopback():
    from gateway.security import check_bind, is_loopback
    from producers.errors import ConfigError

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_bind("127.0.0.1", has_keys=False, insecure=False)
    check_bind("0.0.0.0", has_keys=True, insecure=False)
    check_bind("0.0.0.0", has_keys=False, insecure=True)
    try:
        check_bind("0.0.0.0", has_keys=False, insecure=False)
    except ConfigError as error:
        assert "--insecure" in str(error)
    else:
        raise AssertionError("a keyless non-loopback bind was accepted")
