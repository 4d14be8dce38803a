"""``POST /v1/embeddings`` on a feature-extraction deployment.

Each input becomes one job input; the worker pools its token vectors (mean
over the real tokens, or the first token) and L2-normalises them, as the
deployment's ``embedding_pool``/``embedding_normalize`` say (mean and
normalised by default), so one vector per input crosses Redis.
"""

from __future__ import annotations

import base64
import struct

from gateway.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage
from gateway.serving_models import resolve_model
from gateway.state import GatewayState, JobPlan
from producers.errors import InvalidInput, JobError, PayloadTooLarge
from producers.job import Job

TASK = "feature-extraction"


def _b64_float32(vector: list[float]) -> str:
    # OpenAI's base64 encoding: the vector's little-endian float32 bytes.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def plan(state: GatewayState, request: EmbeddingRequest) -> JobPlan:
    """Check the request and name the job it needs on the deployment ``request.model`` names."""
    texts = _texts(request)
    if not texts:
        raise InvalidInput("'input' is an empty list")
    if len(texts) > state.max_inputs:
        raise PayloadTooLarge(f"'input' has {len(texts)} items; this gateway accepts at most {state.max_inputs}")
    info = await resolve_model(state, request.model, TASK)
    deployment = state.deployment_config(info.name)
    params = {"pool": deployment.embedding_pool if deployment else "mean",
              "normalize": deployment.embedding_normalize if deployment else True}
    return JobPlan(deployment=info.name, inputs=texts, params=params)


async def respond(state: GatewayState, request: EmbeddingRequest, job: Job) -> EmbeddingResponse:
    """The response to ``request`` from its job's result (waited for up to ``max_wait_s``)."""
    texts = _texts(request)
    vectors = await state.output_within_max_wait(job)
    if not isinstance(vectors, list) or len(vectors) != len(texts):
        raise JobError(f"deployment returned {len(vectors)} vectors for {len(texts)} inputs")
    usage = await job.ausage() or {}
    prompt_tokens = int(usage.get("prompt_tokens", 0))
    data = [EmbeddingData(index=index, embedding=_b64_float32(vector) if request.encoding_format == "base64"
                          else [float(x) for x in vector])
            for index, vector in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=request.model,
                             usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))


async def create_embedding(state: GatewayState, request: EmbeddingRequest) -> EmbeddingResponse:
    """Run the inputs through the deployment ``request.model`` names and return their vectors."""
    return await respond(state, request, await state.submit(await plan(state, request)))


def _texts(request: EmbeddingRequest) -> list[str]:
    return [request.input] if isinstance(request.input, str) else list(request.input)
