"""worker.media: allowlisted fetches, base64, paths under a root, and safe image/audio decoding."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydantic
import pytest
import soundfile
from PIL import Image

from producers.errors import MediaError
from producers.urlguard import host_allowed
from worker.media import (
    MAX_REDIRECTS,
    MediaPolicy,
    decode_audio,
    decode_image,
    fetch_bytes,
    is_media_reference,
)

LOOPBACK = "127.0.0.1"


def _png_bytes(size=(24, 16), color=(200, 30, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _sine(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _audio_bytes(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(_png_bytes((1, 1)))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


PNG = _png_bytes()
WAV = _audio_bytes(_sine(16_000, 0.5), 16_000, "WAV")
BIG_BYTES = 5000


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type="application/octet-stream", length=True):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        path = self.path
        if path == "/image.png":
            self._send(PNG, "image/png")
        elif path == "/audio.wav":
            self._send(WAV, "audio/wav")
        elif path == "/redirect-ok":
            self._redirect("/image.png")
        elif path == "/redirect-out":
            self._redirect("http://evil.example.com/image.png")
        elif path == "/redirect-localhost":
            self._redirect(f"http://localhost:{self.server.server_port}/image.png")
        elif path.startswith("/hop/"):
            hops = int(path.rsplit("/", 1)[1])
            self._redirect(f"/hop/{hops - 1}" if hops > 0 else "/image.png")
        elif path == "/big":
            self._send(b"x" * BIG_BYTES)
        elif path == "/big-no-length":
            self.close_connection = True
            self._send(b"x" * BIG_BYTES, length=False)
        elif path == "/lying-length":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"x" * BIG_BYTES)
        elif path == "/slow":
            time.sleep(2.0)
            self._send(PNG, "image/png")
        elif path == "/drip":
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_error(404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture(scope="module")
def server():
    httpd = _Server((LOOPBACK, 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def policy():
    return MediaPolicy(allowed_hosts={LOOPBACK}, allow_private_hosts={LOOPBACK}, timeout_s=5.0)


# --- policy and references ----------------------------------------------------------------------


def test_policy_is_frozen_and_validated():
    policy = MediaPolicy(allowed_hosts={"Images.Example.COM."})
    assert policy.allowed_hosts == frozenset({"images.example.com"})
    with pytest.raises(pydantic.ValidationError):
        policy.max_bytes = 1
    with pytest.raises(pydantic.ValidationError):
        MediaPolicy(max_bytes=0)


def test_host_patterns():
    allowed = frozenset({"img.example.com", "*.cdn.example.com"})
    assert host_allowed("img.example.com", allowed)
    assert host_allowed("IMG.example.com.", allowed)
    assert host_allowed("a.cdn.example.com", allowed)
    assert host_allowed("a.b.cdn.example.com", allowed)
    assert not host_allowed("cdn.example.com", allowed)
    assert not host_allowed("evilcdn.example.com", allowed)
    assert not host_allowed("img.example.com.evil.org", allowed)
    assert not host_allowed("sub.img.example.com", allowed)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://x.org/a.png", True),
        ("HTTP://x.org/a.png", True),
        ({"b64": "AAAA", "mime": "image/png"}, True),
        ({"path": "a.png"}, True),
        ({"array": [0.0], "sampling_rate": 16000}, True),
        ({"raw": [0.0], "sampling_rate": 16000}, True),
        ({"raw": [0.0]}, False),
        ("a/b.png", False),
        ("what is in the picture?", False),
        ("ftp://x.org/a.png", False),
        (42, False),
        ({"text": "hi"}, False),
    ],
)
def test_is_media_reference(value, expected):
    assert is_media_reference(value) is expected


# --- fetching -----------------------------------------------------------------------------------


def test_allowed_fetch(server, policy):
    assert fetch_bytes(f"{server}/image.png", policy) == PNG
    assert decode_image(f"{server}/image.png", policy).size == (24, 16)


def test_host_not_on_allowlist(server):
    policy = MediaPolicy(allowed_hosts={"images.example.com"})
    with pytest.raises(MediaError, match=r"'127\.0\.0\.1'.*not on the allowlist"):
        fetch_bytes(f"{server}/image.png", policy)


@pytest.mark.parametrize("host", [LOOPBACK, "localhost"])
def test_allowlisted_host_on_loopback_needs_allow_private(server, host):
    port = server.rsplit(":", 1)[1]
    policy = MediaPolicy(allowed_hosts={host})
    with pytest.raises(MediaError, match="resolves to a private address"):
        fetch_bytes(f"http://{host}:{port}/image.png", policy)


def test_unsupported_scheme(policy):
    with pytest.raises(MediaError, match="unsupported URL scheme"):
        fetch_bytes("file:///etc/passwd", policy)


def test_redirect_within_allowlist(server, policy):
    assert fetch_bytes(f"{server}/redirect-ok", policy) == PNG
    assert fetch_bytes(f"{server}/hop/{MAX_REDIRECTS - 1}", policy) == PNG


def test_redirect_to_host_off_allowlist_is_refused(server, policy):
    with pytest.raises(MediaError, match=r"'evil\.example\.com'.*not on the allowlist"):
        fetch_bytes(f"{server}/redirect-out", policy)


def test_redirect_to_private_host_is_rechecked(server):
    policy = MediaPolicy(allowed_hosts={LOOPBACK, "localhost"}, allow_private_hosts={LOOPBACK})
    with pytest.raises(MediaError, match="'localhost'.*private address"):
        fetch_bytes(f"{server}/redirect-localhost", policy)


def test_too_many_redirects(server, policy):
    with pytest.raises(MediaError, match="too many redirects"):
        fetch_bytes(f"{server}/hop/{MAX_REDIRECTS + 1}", policy)


@pytest.mark.parametrize("path", ["/big", "/big-no-length"])
def test_size_cap(server, path):
    policy = MediaPolicy(allowed_hosts={LOOPBACK}, allow_private_hosts={LOOPBACK}, max_bytes=1000)
    with pytest.raises(MediaError, match=r"too large: \d+ bytes > 1000"):
        fetch_bytes(f"{server}{path}", policy)


def test_bytes_past_content_length_are_never_read(server, policy):
    assert fetch_bytes(f"{server}/lying-length", policy) == b"x" * 10


def test_http_error_is_reported(server, policy):
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_bytes(f"{server}/missing", policy)


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_timeout(server, path):
    policy = MediaPolicy(allowed_hosts={LOOPBACK}, allow_private_hosts={LOOPBACK}, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"timed out after 0\.5s"):
        fetch_bytes(f"{server}{path}", policy)
    assert time.monotonic() - started < 1.5


def test_audio_from_url(server, policy):
    audio = decode_audio(f"{server}/audio.wav", policy, sampling_rate=16_000)
    assert audio["raw"].shape == (8000,)


# --- base64 -------------------------------------------------------------------------------------


def test_b64_image_and_audio():
    policy = MediaPolicy()
    image = decode_image({"b64": base64.b64encode(PNG).decode(), "mime": "image/png"}, policy)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 30, 60)
    audio = decode_audio({"b64": base64.b64encode(WAV).decode(), "mime": "audio/wav"}, policy, 16_000)
    np.testing.assert_allclose(audio["raw"], _sine(16_000, 0.5), atol=1e-4)
    assert audio["raw"].dtype == np.float32 and audio["sampling_rate"] == 16_000


def test_b64_invalid_and_too_large():
    with pytest.raises(MediaError, match="invalid base64"):
        decode_image({"b64": "not base64!!"}, MediaPolicy())
    with pytest.raises(MediaError, match=r"too large: \d+ bytes > 20"):
        decode_image({"b64": base64.b64encode(PNG).decode()}, MediaPolicy(max_bytes=20))


# --- paths --------------------------------------------------------------------------------------


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "image.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "inner-link.png").symlink_to(root / "sub" / "image.png")
    return root


def test_path_under_root(data_root):
    policy = MediaPolicy(data_root=data_root)
    assert decode_image({"path": "sub/image.png"}, policy).size == (24, 16)
    assert decode_image("sub/image.png", policy).size == (24, 16)
    assert decode_image(str(data_root / "sub" / "image.png"), policy).size == (24, 16)
    assert decode_image({"path": "inner-link.png"}, policy).size == (24, 16)


@pytest.mark.parametrize("path", ["../outside.png", "sub/../../outside.png", "link.png"])
def test_path_escaping_root_is_refused(data_root, path):
    with pytest.raises(MediaError, match="path escapes data root"):
        decode_image({"path": path}, MediaPolicy(data_root=data_root))


def test_absolute_path_elsewhere_is_refused(data_root):
    with pytest.raises(MediaError, match="path escapes data root"):
        decode_image(str(data_root.parent / "outside.png"), MediaPolicy(data_root=data_root))


def test_paths_refused_without_data_root(data_root):
    with pytest.raises(MediaError, match="no data_root"):
        decode_image({"path": str(data_root / "sub" / "image.png")}, MediaPolicy())


def test_missing_file_and_directory(data_root):
    policy = MediaPolicy(data_root=data_root)
    with pytest.raises(MediaError, match="no such file"):
        decode_image({"path": "nope.png"}, policy)
    with pytest.raises(MediaError, match="not a regular file"):
        decode_image({"path": "sub"}, policy)


# --- image decoding -----------------------------------------------------------------------------


def test_truncated_png():
    with pytest.raises(MediaError, match="truncated or corrupt image"):
        decode_image({"b64": base64.b64encode(PNG[: len(PNG) // 2]).decode()}, MediaPolicy())


def test_not_an_image():
    with pytest.raises(MediaError, match="not a supported image"):
        decode_image({"b64": base64.b64encode(b"hello world").decode()}, MediaPolicy())


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_decompression_bomb(side):
    bomb = base64.b64encode(_bomb_png(side, side)).decode()
    with pytest.raises(MediaError, match="too large"):
        decode_image({"b64": bomb}, MediaPolicy())


def test_pixel_cap_applies_to_small_limits():
    with pytest.raises(MediaError, match=r"24x16 = 384 pixels > 100"):
        decode_image({"b64": base64.b64encode(PNG).decode()}, MediaPolicy(max_image_pixels=100))


def test_palette_image_becomes_rgb():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).convert("P").save(buffer, format="PNG")
    image = decode_image({"b64": base64.b64encode(buffer.getvalue()).decode()}, MediaPolicy())
    assert image.mode == "RGB"


# --- audio decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_audio_files_are_downmixed_and_resampled(fmt, data_root):
    mono = _sine(8_000, 1.0)
    stereo = np.stack([mono, mono], axis=1)
    (data_root / f"clip.{fmt.lower()}").write_bytes(_audio_bytes(stereo, 8_000, fmt))
    audio = decode_audio({"path": f"clip.{fmt.lower()}"}, MediaPolicy(data_root=data_root), 16_000)
    assert audio["sampling_rate"] == 16_000
    assert audio["raw"].dtype == np.float32 and audio["raw"].ndim == 1
    assert abs(audio["raw"].shape[0] - 16_000) <= 1
    expected = _sine(16_000, 1.0)
    middle = slice(1000, 15000)
    tolerance = 0.05 if fmt == "OGG" else 0.01
    np.testing.assert_allclose(audio["raw"][middle], expected[middle], atol=tolerance)


def test_corrupt_audio():
    with pytest.raises(MediaError, match="corrupt or unsupported audio"):
        decode_audio({"b64": base64.b64encode(b"RIFF....WAVEfmt garbage").decode()}, MediaPolicy(), 16_000)
    with pytest.raises(MediaError, match="corrupt or unsupported audio"):
        decode_audio({"b64": base64.b64encode(WAV[: len(WAV) // 8][:40]).decode()}, MediaPolicy(), 16_000)


def test_audio_arrays():
    policy = MediaPolicy()
    same = decode_audio({"array": [0.0, 0.5, -0.5], "sampling_rate": 16_000}, policy, 16_000)
    np.testing.assert_array_equal(same["raw"], np.array([0.0, 0.5, -0.5], dtype=np.float32))
    resampled = decode_audio({"raw": _sine(8_000, 1.0).tolist(), "sampling_rate": 8_000}, policy, 16_000)
    assert resampled["raw"].shape == (16_000,)
    stereo = decode_audio({"array": [[1.0, 0.0], [0.0, 1.0]], "sampling_rate": 16_000}, policy, 16_000)
    np.testing.assert_array_equal(stereo["raw"], [0.5, 0.5])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"array": [0.0, float("nan")], "sampling_rate": 16_000}, "NaN or infinite"),
        ({"array": [0.0, float("inf")], "sampling_rate": 16_000}, "NaN or infinite"),
        ({"array": ["a", "b"], "sampling_rate": 16_000}, "must be numbers"),
        ({"array": [[[0.0]]], "sampling_rate": 16_000}, "must be"),
        ({"array": [0.0], "sampling_rate": 0}, "sampling_rate"),
        ({"array": [0.0], "sampling_rate": "16000"}, "sampling_rate"),
    ],
)
def test_bad_audio_arrays(value, message):
    with pytest.raises(MediaError, match=message):
        decode_audio(value, MediaPolicy(), 16_000)


def test_audio_duration_cap():
    policy = MediaPolicy(max_audio_seconds=0.25)
    with pytest.raises(MediaError, match="audio too long"):
        decode_audio({"b64": base64.b64encode(WAV).decode()}, policy, 16_000)
    with pytest.raises(MediaError, match="audio too long"):
        decode_audio({"array": [0.0] * 8000, "sampling_rate": 16_000}, policy, 16_000)
