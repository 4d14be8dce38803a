"""Decode the image and audio inputs of jobs safely.

A job carries media as JSON, in one of these forms:

- ``"https://host/picture.png"``: fetched only from hosts on the allowlist (no SSRF);
- ``{"b64": "...", "mime": "image/png"}``: base64 bytes;
- ``{"path": "a/b.wav"}`` or a plain string path: only under the policy's ``data_root``;
- audio only: ``{"array": [...], "sampling_rate": 16000}`` (or ``"raw"``), the transformers form.

Every failure raises :class:`producers.errors.MediaError` with a message naming what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from producers.errors import MediaError
from producers.urlguard import (REDIRECT_STATUSES, URL_SCHEMES, check_url, normalise_hosts,
                                 pinned_connection, redact)

logger = logging.getLogger(__name__)

#: Redirect hops followed before a fetch is refused.
MAX_REDIRECTS = 3
#: Bytes read from the network per ``read`` call.
READ_CHUNK_BYTES = 64 * 1024
#: Image formats PIL may decode; others (EPS, PSD, ...) widen the attack surface for no use.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


class MediaPolicy(BaseModel):
    """Where media may come from and how big it may be.

    ``MediaPolicy(allowed_hosts={"images.example.com", "*.cdn.example.com"}, data_root=Path("/data"))``
    allows that host exactly, any subdomain of ``cdn.example.com``, and files under ``/data``.
    A host resolving to a private, loopback or link-local address is refused unless it is
    also listed in ``allow_private_hosts``.
    """

    model_config = ConfigDict(frozen=True)

    allowed_hosts: frozenset[str] = frozenset()
    allow_private_hosts: frozenset[str] = frozenset()
    data_root: Path | None = None
    max_bytes: int = Field(default=20 * 2**20, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    max_audio_seconds: float = Field(default=4 * 3600, gt=0)

    @field_validator("allowed_hosts", "allow_private_hosts", mode="after")
    @classmethod
    def _lower_hosts(cls, hosts: frozenset[str]) -> frozenset[str]:
        return normalise_hosts(hosts)


def is_media_reference(value: Any) -> bool:
    """True for a URL string or one of the dict forms (b64, path, audio array)."""
    if isinstance(value, str):
        return urlsplit(value).scheme.lower() in URL_SCHEMES
    if isinstance(value, dict):
        if "b64" in value or "path" in value:
            return True
        return "sampling_rate" in value and ("array" in value or "raw" in value)
    return False


# --- URLs ---------------------------------------------------------------------------------------
# The SSRF rules themselves live in producers.urlguard, shared with webhook deliveries.


def _too_large(size: int, policy: MediaPolicy, what: str) -> MediaError:
    return MediaError(f"{what} too large: {size} bytes > {policy.max_bytes}")


def _fetch_once(url: str, policy: MediaPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET without following redirects: (status, location, body)."""
    checked = check_url(url, policy.allowed_hosts, policy.allow_private_hosts, MediaError)
    shown = checked.shown
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MediaError(f"timed out after {policy.timeout_s}s fetching {shown}")
    connection = pinned_connection(checked, remaining)
    try:
        connection.request("GET", checked.target, headers={"User-Agent": "pipefleet", "Accept-Encoding": "identity"})
        response = connection.getresponse()
        if response.status in REDIRECT_STATUSES:
            return response.status, response.getheader("Location"), b""
        if not 200 <= response.status < 300:
            raise MediaError(f"fetching {shown} failed: HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > policy.max_bytes:
            raise _too_large(int(length), policy, f"response from {shown} is")
        body = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MediaError(f"timed out after {policy.timeout_s}s fetching {shown}")
            # http.client drops connection.sock once the response owns it; the deadline still applies.
            connection.pinned_sock.settimeout(remaining)
            chunk = response.read1(READ_CHUNK_BYTES)
            if not chunk:
                break
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(len(body), policy, f"response from {shown} is")
        return response.status, None, bytes(body)
    except TimeoutError as e:
        raise MediaError(f"timed out after {policy.timeout_s}s fetching {shown}") from e
    except (OSError, http.client.HTTPException) as e:
        raise MediaError(f"fetching {shown} failed: {e}") from e
    finally:
        connection.close()


def fetch_bytes(url: str, policy: MediaPolicy) -> bytes:
    """GET ``url`` within the policy: allowlisted public hosts, at most 3 checked redirects."""
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _fetch_once(url, policy, deadline)
        if location is None:
            if status in REDIRECT_STATUSES:
                raise MediaError(f"redirect without a Location from {redact(url)}")
            return body
        url = urljoin(url, location)
    raise MediaError(f"too many redirects (more than {MAX_REDIRECTS}) fetching {redact(url)}")


# --- base64 and paths ---------------------------------------------------------------------------


def _decode_b64(text: Any, policy: MediaPolicy) -> bytes:
    if not isinstance(text, str):
        raise MediaError("'b64' must be a base64 string")
    text = "".join(text.split())
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    # Refuse before decoding: base64 encodes 3 bytes in 4 characters.
    decoded_size = len(text) * 3 // 4
    if decoded_size > policy.max_bytes + 2:
        raise _too_large(decoded_size, policy, "base64 payload is")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"invalid base64 payload: {e}") from e
    if len(data) > policy.max_bytes:
        raise _too_large(len(data), policy, "base64 payload is")
    return data


def _read_path(path: Any, policy: MediaPolicy) -> bytes:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise MediaError("'path' must be a non-empty string")
    if policy.data_root is None:
        raise MediaError(f"paths are not allowed (no data_root configured): {path!r}")
    root = policy.data_root.resolve()
    # strict=True resolves every symlink, so a link pointing out of the root is caught below.
    try:
        resolved = (root / path).resolve(strict=True)
    except FileNotFoundError as e:
        raise MediaError(f"no such file under data root: {path!r}") from e
    except (OSError, RuntimeError) as e:
        raise MediaError(f"cannot resolve path {path!r}: {e}") from e
    if not resolved.is_relative_to(root):
        raise MediaError(f"path escapes data root: {path!r}")
    if not resolved.is_file():
        raise MediaError(f"not a regular file: {path!r}")
    size = resolved.stat().st_size
    if size > policy.max_bytes:
        raise _too_large(size, policy, f"file {path!r} is")
    try:
        return resolved.read_bytes()
    except OSError as e:
        raise MediaError(f"cannot read {path!r}: {e}") from e


def _load_bytes(value: Any, policy: MediaPolicy) -> bytes:
    """The raw bytes behind a URL, a ``data:`` URL, ``{"b64"}``, ``{"path"}`` or plain path string."""
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value[:100]:  # as OpenAI's image_url parts send images
            return _decode_b64(value, policy)
        if urlsplit(value).scheme.lower() in URL_SCHEMES:
            return fetch_bytes(value, policy)
        return _read_path(value, policy)
    if isinstance(value, dict):
        if "b64" in value:
            return _decode_b64(value["b64"], policy)
        if "path" in value:
            return _read_path(value["path"], policy)
        raise MediaError(f"unknown media dict with keys {sorted(value)}; expected 'b64' or 'path'")
    raise MediaError(f"unsupported media input of type {type(value).__name__}")


# --- images -------------------------------------------------------------------------------------


def _check_pixels(image, policy: MediaPolicy) -> None:
    pixels = image.width * image.height
    if pixels > policy.max_image_pixels:
        raise MediaError(
            f"image too large: {image.width}x{image.height} = {pixels} pixels > {policy.max_image_pixels}"
        )


def _to_rgb(image):
    from PIL import ImageOps

    # Same orientation and mode as transformers.image_utils.load_image, so results match in-process.
    return ImageOps.exif_transpose(image).convert("RGB")


def decode_image(value: Any, policy: MediaPolicy):
    """Decode an image input to an RGB ``PIL.Image.Image`` within the policy's limits."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        _check_pixels(value, policy)
        return _to_rgb(value)
    data = _load_bytes(value, policy)
    try:
        with warnings.catch_warnings():
            # max_image_pixels is the limit that counts; PIL's hard limit (DecompressionBombError) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            # The header gives the size: refuse bombs before decoding any pixel.
            _check_pixels(image, policy)
            image.load()
            return _to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"image too large (decompression bomb): {e}") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"not a supported image (allowed: {', '.join(IMAGE_FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"truncated or corrupt image: {e}") from e


# --- audio --------------------------------------------------------------------------------------


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono ``audio``; polyphase filtering with scipy, else linear interpolation."""
    if from_rate == to_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    try:
        from scipy.signal import resample_poly
    except ImportError:
        length = max(1, round(audio.shape[0] * to_rate / from_rate))
        positions = np.arange(length) * (from_rate / to_rate)
        return np.interp(positions, np.arange(audio.shape[0]), audio).astype(np.float32)
    divisor = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(audio, to_rate // divisor, from_rate // divisor).astype(np.float32)


def _finish_audio(samples: np.ndarray, rate: int, policy: MediaPolicy, sampling_rate: int) -> dict:
    if not np.all(np.isfinite(samples)):
        raise MediaError("audio contains NaN or infinite samples")
    duration_s = samples.shape[0] / rate
    if duration_s > policy.max_audio_seconds:
        raise MediaError(f"audio too long: {duration_s:.1f}s > {policy.max_audio_seconds}s")
    return {"raw": resample(samples, rate, sampling_rate), "sampling_rate": sampling_rate}


def _array_audio(value: dict, policy: MediaPolicy, sampling_rate: int) -> dict:
    rate = value.get("sampling_rate")
    if rate is None and set(value) == {"array"}:
        # A bare array (the client's encoding of pipe(numpy_array)) is at the model's rate, as in-process.
        rate = sampling_rate
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise MediaError(f"'sampling_rate' must be a positive integer, got {rate!r}")
    raw = value["array"] if "array" in value else value["raw"]
    try:
        samples = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MediaError(f"audio array must be numbers: {e}") from e
    if samples.ndim == 2 and 1 <= samples.shape[0] <= 2:
        # (channels, samples), the layout transformers reads.
        samples = samples.mean(axis=0)
    if samples.ndim != 1:
        raise MediaError(f"audio array must be (samples,) or (channels<=2, samples), got shape {samples.shape}")
    if samples.size * 4 > policy.max_bytes:
        raise _too_large(samples.size * 4, policy, "audio array is")
    return _finish_audio(samples.astype(np.float32), rate, policy, sampling_rate)


def decode_audio(value: Any, policy: MediaPolicy, sampling_rate: int) -> dict:
    """Decode an audio input to ``{"raw": float32 mono array, "sampling_rate": sampling_rate}``."""
    import soundfile

    if isinstance(value, dict) and ("array" in value or "raw" in value):
        return _array_audio(value, policy, sampling_rate)
    data = _load_bytes(value, policy)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            rate = sound.samplerate
            if sound.frames / rate > policy.max_audio_seconds:
                raise MediaError(f"audio too long: {sound.frames / rate:.1f}s > {policy.max_audio_seconds}s")
            samples = sound.read(dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (RuntimeError, ValueError, TypeError, OSError) as e:
        raise MediaError(f"corrupt or unsupported audio file: {e}") from e
    if samples.shape[0] == 0:
        raise MediaError("audio file has no samples")
    return _finish_audio(samples.mean(axis=1), rate, policy, sampling_rate)
