"""``pipefleet gateway``: the fleet over HTTP, as a jobs API and an OpenAI-compatible API.

A stateless ASGI app (FastAPI on uvicorn) that reaches the fleet only through
:class:`producers.FleetClient`; it never imports torch or transformers. Run
as many as you like behind a load balancer.
"""

from gateway.app import create_app

__all__ = ["create_app"]
