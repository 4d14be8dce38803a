"""``POST /v1/completions`` on a text-generation deployment: prompts in, generated text out."""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from gateway.generation import (cut_at_stop, expand_inputs, finish_reason, flat_records, flat_texts, job_outcome,
                                sampling_params)
from gateway.logprobs import completion_logprobs, kept_entries
from gateway.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from gateway.serving_models import resolve_model
from gateway.state import GatewayState, JobPlan
from gateway.streaming import openai_stream
from producers.errors import InvalidInput, PayloadTooLarge
from producers.job import Job

TASK = "text-generation"
PATH = "/v1/completions"


def _prompts(request: CompletionRequest) -> list[Any]:
    return [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)


async def plan(state: GatewayState, request: CompletionRequest) -> JobPlan:
    """Check the request and name the job it needs."""
    prompts = _prompts(request)
    if not prompts:
        raise InvalidInput("'prompt' is an empty list")
    if len(prompts) * request.n > state.max_inputs:
        raise PayloadTooLarge(f"{len(prompts)} prompt(s) x n={request.n} exceed this gateway's "
                              f"{state.max_inputs} inputs per request")
    info = await resolve_model(state, request.model, TASK)
    max_tokens = request.max_tokens or state.settings.default_max_tokens
    return JobPlan(deployment=info.name, inputs=expand_inputs(request, prompts),
                   params=sampling_params(request, max_tokens), stream=request.stream)


async def respond(state: GatewayState, request: CompletionRequest, job: Job) -> CompletionResponse:
    """The response to ``request`` from its job's result: ``n`` texts per prompt."""
    n_prompts = len(_prompts(request))
    outputs = await state.output_within_max_wait(job)
    outcome = await job_outcome(job)
    stops = request.stops()
    choices = []
    for index, record in enumerate(flat_records(outputs, n_prompts, request.n)):
        text, stopped = cut_at_stop(str(record["generated_text"]), stops)
        logprobs = None if request.logprobs is None else completion_logprobs(kept_entries(record, text, stopped))
        choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                        finish_reason=finish_reason(index, stopped, outcome)))
    return CompletionResponse(model=request.model, choices=choices, usage=outcome.usage())


async def create_completion(state: GatewayState, request: CompletionRequest) -> CompletionResponse:
    """Generate ``n`` texts per prompt and wait for them."""
    return await respond(state, request, await state.submit(await plan(state, request)))


async def stream_completion(state: GatewayState, request: CompletionRequest) -> AsyncIterator[str]:
    """Submit the job, then its text as completion chunks (``data`` strings, ``[DONE]`` last)."""
    job, n_prompts = await state.submit(await plan(state, request)), len(_prompts(request))
    chunk_id = f"cmpl-{uuid.uuid4().hex}"

    def make_chunk(index: int | None, text: str | None, reason: str | None, usage: Usage | None,
                   entries: list | None = None) -> Any:
        logprobs = None if entries is None else completion_logprobs(entries)
        choices = [] if index is None else [CompletionChoice(index=index, text=text or "", logprobs=logprobs,
                                                             finish_reason=reason)]
        return CompletionResponse(id=chunk_id, model=request.model, choices=choices, usage=usage)

    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    records = (lambda output: flat_records(output, n_prompts, request.n)) if request.logprobs is not None else None
    return openai_stream(job, path=PATH, n_choices=n_prompts * request.n, stops=request.stops(),
                         make_chunk=make_chunk, include_usage=include_usage,
                         whole_texts=lambda output: flat_texts(output, n_prompts, request.n),
                         records=records, max_wait_s=state.settings.max_wait_s)
