"""Check a job's JSON inputs and turn them into what the pipeline takes.

Media never reaches ``transformers`` as a URL or a path: the worker fetches
and decodes it itself under the fleet's :class:`worker.media.MediaPolicy`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from producers.errors import InvalidInput

logger = logging.getLogger(__name__)

IMAGE_TASKS = frozenset({
    "image-classification", "object-detection", "image-segmentation", "depth-estimation",
    "image-feature-extraction", "zero-shot-image-classification", "mask-generation",
    "zero-shot-object-detection", "image-to-text",
})
AUDIO_TASKS = frozenset({
    "automatic-speech-recognition", "audio-classification", "zero-shot-audio-classification",
})
#: Tasks whose input is a dict with an image under one of these keys.
IMAGE_DICT_TASKS = {"visual-question-answering": ("image",), "document-question-answering": ("image",),
                    "image-text-to-text": ("images",)}

CHAT_IMAGE_KEYS = ("image", "url")
"""Where an ``{"type": "image"}`` part of a chat message holds its image, as transformers' chat templates read it."""


def _check_text(value: Any, *, index: int, max_chars: int, where: str = "input") -> None:
    if len(value) > max_chars:
        raise InvalidInput(f"{where} {index} has {len(value)} characters; the limit is {max_chars}")


def _check_json_text_input(value: Any, *, index: int, max_chars: int) -> None:
    if isinstance(value, str):
        _check_text(value, index=index, max_chars=max_chars)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                _check_text(item, index=index, max_chars=max_chars, where=f"input {key!r} of item")
            elif isinstance(item, list) and all(isinstance(x, str) for x in item):
                for text in item:
                    _check_text(text, index=index, max_chars=max_chars)
            elif item is not None and not isinstance(item, (int, float, bool)):
                raise InvalidInput(f"input {index}: field {key!r} must be text, got {type(item).__name__}")
        return
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for message in value:  # a chat: [{"role": ..., "content": ...}, ...]
            if not isinstance(message.get("role"), str) or "content" not in message:
                raise InvalidInput(f"input {index}: chat messages need 'role' and 'content'")
        return
    raise InvalidInput(
        f"input {index} must be text, a dict of text fields or a chat, got {type(value).__name__}"
    )


def _vlm_input(value: Any, *, index: int, policy: Any, max_chars: int) -> Any:
    """An image-text-to-text input: ``{"images", "text"}`` or a chat whose image parts are decoded here."""
    from worker import media

    if isinstance(value, dict):
        if value.get("images") is None or not isinstance(value.get("text"), str):
            raise InvalidInput(f"input {index} must be a chat or a dict with 'images' and 'text' "
                               f"(got keys {sorted(value)})")
        _check_text(value["text"], index=index, max_chars=max_chars)
        images = value["images"]
        decoded = [media.decode_image(image, policy) for image in images] if isinstance(images, list) \
            else media.decode_image(images, policy)
        return {**value, "images": decoded}
    if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        raise InvalidInput(f"input {index} must be a chat or a dict with 'images' and 'text', "
                           f"got {type(value).__name__}")
    messages = []
    for message in value:
        content = message.get("content")
        if not isinstance(message.get("role"), str) or content is None:
            raise InvalidInput(f"input {index}: chat messages need 'role' and 'content'")
        if isinstance(content, str):
            _check_text(content, index=index, max_chars=max_chars)
            messages.append(message)
            continue
        if not (isinstance(content, list) and all(isinstance(part, dict) for part in content)):
            raise InvalidInput(f"input {index}: a message's content is text or a list of parts")
        parts = []
        for part in content:
            if part.get("type") == "image":
                found = [key for key in CHAT_IMAGE_KEYS if part.get(key) is not None]
                if not found:
                    raise InvalidInput(f"input {index}: an image part needs one of {list(CHAT_IMAGE_KEYS)}")
                part = {"type": "image", "image": media.decode_image(part[found[0]], policy)}
            elif part.get("type") == "text" and isinstance(part.get("text"), str):
                _check_text(part["text"], index=index, max_chars=max_chars)
            else:
                raise InvalidInput(f"input {index}: a content part is {{'type': 'text', 'text': ...}} or "
                                   f"{{'type': 'image', 'image' or 'url': ...}}, got {sorted(part)}")
            parts.append(part)
        messages.append({**message, "content": parts})
    return messages


def prepare_inputs(task: str, inputs: list[Any], *, policy: Callable[[], Any], sampling_rate: int | None,
                   max_chars: int) -> list[Any]:
    """Validate each input for ``task`` and decode its media; raises InvalidInput/MediaError.

    ``policy`` returns the deployment's media policy; it is only asked for media tasks.
    """
    if task in IMAGE_TASKS or task in AUDIO_TASKS or task in IMAGE_DICT_TASKS:
        from worker import media

        policy = policy()

    prepared = []
    for index, value in enumerate(inputs):
        if task in IMAGE_TASKS:
            prepared.append(media.decode_image(value, policy))
        elif task in AUDIO_TASKS:
            prepared.append(media.decode_audio(value, policy, sampling_rate or 16_000))
        elif task == "image-text-to-text":
            prepared.append(_vlm_input(value, index=index, policy=policy, max_chars=max_chars))
        elif task in IMAGE_DICT_TASKS:
            if not isinstance(value, dict):
                raise InvalidInput(f"input {index} must be a dict with {IMAGE_DICT_TASKS[task][0]!r} and 'question'")
            item = dict(value)
            for key in IMAGE_DICT_TASKS[task]:
                if key in item and item[key] is not None:
                    item[key] = media.decode_image(item[key], policy)
            prepared.append(item)
        else:
            _check_json_text_input(value, index=index, max_chars=max_chars)
            prepared.append(value)
    return prepared
