"""``POST /v1/chat/completions`` on a text-generation or an image-text-to-text (vision-language) deployment.

The messages travel as one chat input, so the worker's pipeline applies the
tokenizer's (or processor's) chat template (with the generation prompt) exactly
as ``pipe(messages)`` does in-process. ``image_url`` parts become the chat's
``{"type": "image", "url"}`` parts, which the worker fetches under its media
policy; only an image-text-to-text deployment takes them.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

from gateway.generation import (cut_at_stop, expand_inputs, finish_reason, flat_records, flat_texts, job_outcome,
                                sampling_params, vision_params)
from gateway.logprobs import chat_logprobs, kept_entries
from gateway.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                              ChatCompletionRequest, ChatCompletionResponse, DeltaMessage, Usage)
from gateway.serving_models import resolve_model
from gateway.state import GatewayState, JobPlan
from gateway.streaming import openai_stream
from producers.errors import InvalidParams, PayloadTooLarge
from producers.job import Job

TASK = "text-generation"
VISION_TASK = "image-text-to-text"
PATH = "/v1/chat/completions"


def _max_tokens(state: GatewayState, request: ChatCompletionRequest) -> int:
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise InvalidParams("'max_tokens' and 'max_completion_tokens' disagree; send one of them")
    return request.max_completion_tokens or request.max_tokens or state.settings.default_max_tokens


async def plan(state: GatewayState, request: ChatCompletionRequest) -> JobPlan:
    """Check the request and name the job it needs: the messages travel as one chat input."""
    if request.n > state.max_inputs:
        raise PayloadTooLarge(f"n={request.n} exceeds this gateway's {state.max_inputs} inputs per request")
    info = await resolve_model(state, request.model, TASK, VISION_TASK)
    params = sampling_params(request, _max_tokens(state, request))
    if info.task == VISION_TASK:
        chat = [{"role": message.role, "content": message.parts()} for message in request.messages]
        params = vision_params(params)
    elif any(message.has_images() for message in request.messages):
        raise InvalidParams(f"model {request.model!r} is a {info.task} deployment, which takes no image_url parts; "
                            f"images need an {VISION_TASK} deployment")
    else:
        chat = [{"role": message.role, "content": message.text()} for message in request.messages]
    return JobPlan(deployment=info.name, inputs=expand_inputs(request, [chat]), params=params,
                   stream=request.stream)


async def respond(state: GatewayState, request: ChatCompletionRequest, job: Job) -> ChatCompletionResponse:
    """The response to ``request`` from its job's result: ``n`` assistant messages."""
    outputs = await state.output_within_max_wait(job)
    outcome = await job_outcome(job)
    stops = request.stops()
    choices = []
    for index, record in enumerate(flat_records(outputs, 1, request.n)):
        text, stopped = cut_at_stop(str(record["generated_text"]), stops)
        logprobs = chat_logprobs(kept_entries(record, text, stopped)) if request.logprobs else None
        choices.append(ChatChoice(index=index, message=AssistantMessage(content=text), logprobs=logprobs,
                                  finish_reason=finish_reason(index, stopped, outcome)))
    return ChatCompletionResponse(model=request.model, choices=choices, usage=outcome.usage())


async def create_chat_completion(state: GatewayState, request: ChatCompletionRequest) -> ChatCompletionResponse:
    """Generate ``n`` assistant messages and wait for them."""
    return await respond(state, request, await state.submit(await plan(state, request)))


async def stream_chat_completion(state: GatewayState, request: ChatCompletionRequest) -> AsyncIterator[str]:
    """Submit the job, then its text as chat chunks: a role delta first, ``[DONE]`` last."""
    job = await state.submit(await plan(state, request))
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"

    def make_chunk(index: int | None, text: str | None, reason: str | None, usage: Usage | None,
                   entries: list | None = None) -> Any:
        logprobs = None if entries is None else chat_logprobs(entries)
        choices = [] if index is None else [ChatChunkChoice(index=index, delta=DeltaMessage(content=text),
                                                            logprobs=logprobs, finish_reason=reason)]
        return ChatCompletionChunk(id=chunk_id, model=request.model, choices=choices, usage=usage)

    def first(index: int) -> Any:
        return ChatCompletionChunk(id=chunk_id, model=request.model, choices=[
            ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])

    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return openai_stream(job, path=PATH, n_choices=request.n, stops=request.stops(), make_chunk=make_chunk,
                         include_usage=include_usage, first=first, max_wait_s=state.settings.max_wait_s,
                         whole_texts=lambda output: flat_texts(output, 1, request.n),
                         records=(lambda output: flat_records(output, 1, request.n)) if request.logprobs else None)
