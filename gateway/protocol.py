"""Pydantic models of the OpenAI API that the gateway serves (requests, responses, stream chunks).

Requests forbid unknown fields. Fields OpenAI defines that pipefleet does not
implement are listed in each request's ``NEUTRAL``: they pass only with a
value that changes nothing (``null``, ``0``, ``false``…), as some SDKs send
them that way; any other value is refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from producers.schemas import QuantizationSummary


class OpenAIRequest(BaseModel):
    """Base of the request models: unknown fields are errors, neutral unsupported values are dropped."""

    model_config = ConfigDict(extra="forbid")

    NEUTRAL: ClassVar[dict[str, tuple[Any, ...]]] = {}

    user: str | None = Field(default=None, max_length=256)
    """OpenAI's end-user id (its abuse monitoring): accepted and not used, as vLLM does; no output depends on it."""

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if not (key in cls.NEUTRAL and any(value == n and type(value) is type(n) or value is n
                                                   for n in cls.NEUTRAL[key]))}


MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI's chat limit; the worker's too)."""


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


TokenId = Annotated[str, Field(pattern=r"^\d{1,9}$")]
"""A token id as OpenAI's ``logit_bias`` keys spell it: a decimal string."""

LogitBias = Annotated[float, Field(ge=-100, le=100)]


class GenerationFields(OpenAIRequest):
    """Sampling fields shared by completions and chat completions."""

    model: str
    # Unset (None) sampling fields take the deployment's defaults (gateway.generation).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[TokenId, LogitBias] | None = Field(default=None, max_length=1024)
    """Token id (a decimal string) → a bias from -100 to 100 added to its logit before sampling, as OpenAI's."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's extra sampling params (``extra_body`` in the openai package), for clients written against vLLM.
    top_k: int | None = Field(default=None, ge=1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0)

    def stops(self) -> list[str]:
        """The stop sequences as a list (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]

    def top_logprobs_count(self) -> int | None:
        """Alternatives per token the caller wants with each token's log probability; None: no logprobs."""
        return None


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    NEUTRAL = {"echo": (None, False), "suffix": (None,), "best_of": (None, 1)}

    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Each token's log probability, with this many alternatives (OpenAI allows 5, vLLM 20)."""

    def top_logprobs_count(self) -> int | None:
        """``logprobs`` itself."""
        return self.logprobs


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` part of a message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """Where an image part's image is: an ``https://`` URL (fetched by the worker) or a ``data:`` URL."""

    model_config = ConfigDict(extra="forbid")

    url: str
    detail: Literal["auto"] | None = None
    """OpenAI's ``low`` / ``high`` resolution hints mean nothing to a pipeline's processor: refused, not ignored."""


class ImagePart(BaseModel):
    """One ``{"type": "image_url", "image_url": {"url": ...}}`` part of a message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    """One message of a chat; content is text, or a list of text and image parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    def text(self) -> str:
        """The message's text as one string (image parts left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def has_images(self) -> bool:
        """Whether the content holds an image part."""
        return not isinstance(self.content, str) and any(isinstance(p, ImagePart) for p in self.content)

    def parts(self) -> list[dict[str, str]]:
        """The content as transformers' chat parts: ``{"type": "text", "text"}`` and ``{"type": "image", "url"}``."""
        if isinstance(self.content, str):
            return [{"type": "text", "text": self.content}]
        return [{"type": "text", "text": part.text} if isinstance(part, TextPart)
                else {"type": "image", "url": part.image_url.url} for part in self.content]


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``."""

    NEUTRAL = {"tools": (None, []), "tool_choice": (None, "none"),
               "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}),
               "store": (None, False), "metadata": (None,), "modalities": (None, ["text"])}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    def top_logprobs_count(self) -> int | None:
        """``top_logprobs`` (0 when left out) when ``logprobs`` is true."""
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(OpenAIRequest):
    """``POST /v1/embeddings``; ``input`` is a string or a list of strings."""

    NEUTRAL = {"dimensions": (None,)}

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


def _created() -> int:
    return int(time.time())


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int | None = None
    total_tokens: int = 0


class EmbeddingData(BaseModel):
    """One input's vector: floats, or base64 of little-endian float32."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    """The answer of ``/v1/embeddings``."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


FinishReason = Literal["stop", "length"] | None
"""Why a choice ended: a stop sequence or the end of the text (``stop``), or ``max_tokens`` (``length``)."""

_ChoiceT = TypeVar("_ChoiceT", bound=BaseModel)


class ChoicesObject(BaseModel, Generic[_ChoiceT]):
    """The frame of every generation answer and stream chunk, in OpenAI's field order.

    Each subclass names its choice model and fixes ``object`` (and ``id``'s prefix, where it makes the id).
    """

    id: str
    object: str
    created: int = Field(default_factory=_created)
    model: str
    choices: list[_ChoiceT]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """A completion choice's ``logprobs``: its tokens, their log probabilities, alternatives and text offsets."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One generated text of ``/v1/completions`` (or its piece, in a stream chunk)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None


class CompletionResponse(ChoicesObject[CompletionChoice]):
    """The answer of ``/v1/completions``, and each of its stream chunks."""

    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"


class AssistantMessage(BaseModel):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    """One token and its log probability (``bytes``: its text's UTF-8 bytes)."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token of a chat choice, with the most likely tokens of its step."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``: one entry per generated token of its content."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    """One generated message of ``/v1/chat/completions``."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(ChoicesObject[ChatChoice]):
    """The answer of ``/v1/chat/completions``."""

    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage


class DeltaMessage(BaseModel):
    """What a chat stream chunk adds to its choice's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice's piece in a chat stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(ChoicesObject[ChatChunkChoice]):
    """One SSE chunk of a streamed chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(BaseModel):
    """One entry of ``/v1/models``: a live deployment (``id``) and the model it serves (``root``)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pipefleet"
    root: str
    task: str
    quantization: QuantizationSummary | None = None
    """How the deployment's weights are quantized (``None``: not quantized, or an older worker)."""


class ModelList(BaseModel):
    """The answer of ``/v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
