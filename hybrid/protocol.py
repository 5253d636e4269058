"""The edge loop's wire format: length-prefixed frames of a JSON header and raw array bytes.

A frame is ``MAGIC | header length (uint32) | payload length (uint32) | header | payload``, the
lengths big-endian, the header a UTF-8 JSON object, the payload raw little-endian bytes of at most
one array (C order) whose ``shape`` and ``dtype`` the header names. Lengths are checked against
the receiver's caps *before* anything else is read, so a peer cannot make it buffer an
oversized payload; after such a refusal the rest of the stream cannot be trusted and the
connection is closed (``FramingError``). A frame that was read whole but says something wrong
(``RequestError``: a header that is not UTF-8 JSON, is nested deeper than ``MAX_HEADER_DEPTH`` or
is not an object, a bad shape, an unknown user) leaves the stream in sync. Header parsing never
raises anything else: invalid UTF-8, invalid JSON, JSON the decoder cannot take (nesting past the
recursion limit, an integer over Python's digit limit) are all ``malformed``. A frame must arrive
whole within its deadline once its first byte is read (``timeout``).

Messages (``header["type"]``):

* ``request`` (device -> edge): ``user`` (int, the personalized model's id in the cluster),
  ``tau`` (the device's per-step latency in seconds, its capability), ``alpha`` (its
  accuracy-vs-latency preference), ``key`` (the request's PRNG key data, uint32 list), ``id``
  (free text), and ``x_T`` [H, W, C] float32 as the payload: the prompt stand-in.
* ``latent`` (edge -> device): the request was admitted; ``cut_point`` n (local steps left),
  ``batch`` B, the payload x_n [H, W, C] float32.
* ``local`` (edge -> device): denied; run all ``cut_point`` = T steps on the device.
* ``error``: ``code`` (one of ``ERROR_CODES``) and ``message``.
"""

from __future__ import annotations

import json
import math
import reprlib
import select
import socket
import struct
import time
from typing import Any

import numpy as np

# The format's version: HYB2 names the answer's local steps ``cut_point`` (HYB1 said ``split``), so
# a peer of the old format is refused at its first frame ("bad frame magic").
MAGIC = b"HYB2"
_PREFIX = struct.Struct("!4sII")
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_DEPTH = 8  # a request's header is 2 deep (the key and shape lists)
MAX_ID_CHARS = 128

# Why a request was refused; the client sees exactly one of these.
MALFORMED = "malformed"  # not a frame, bad UTF-8 / JSON, too deep, not an object, truncated
OVERSIZED = "oversized"  # a length prefix over the receiver's cap
BAD_TYPE = "bad_type"  # a message type the receiver does not take
BAD_FIELD = "bad_field"  # a missing or out-of-range header field
BAD_SHAPE = "bad_shape"  # the array's shape, or a payload size that does not match it
BAD_DTYPE = "bad_dtype"
BAD_VALUE = "bad_value"  # non-finite array values
UNKNOWN_USER = "unknown_user"
BUSY = "busy"  # the server is shutting down or at its connection cap
INTERNAL = "internal"  # the edge failed on this window's batch (or on this frame)
TIMEOUT = "timeout"  # a started frame not whole by its deadline, or an idle connection closed
ERROR_CODES = (
  MALFORMED,
  OVERSIZED,
  BAD_TYPE,
  BAD_FIELD,
  BAD_SHAPE,
  BAD_DTYPE,
  BAD_VALUE,
  UNKNOWN_USER,
  BUSY,
  INTERNAL,
  TIMEOUT,
)

_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 3, 80, 80, 40


def show(v: Any) -> str:
  """A short ``repr`` of a peer's value for an error message (bounded length and depth)."""
  return _SHOW.repr(v)


class ProtocolError(Exception):
  """A refused frame; ``code`` is one of ``ERROR_CODES``."""

  def __init__(self, code: str, message: str):
    assert code in ERROR_CODES, code
    self.code = code
    super().__init__(f"{code}: {message}")
    self.message = message


class FramingError(ProtocolError):
  """The byte stream itself is broken or over a cap: reply, then close the connection."""


class RequestError(ProtocolError):
  """A whole frame with bad contents: reply; the stream is still in sync."""


class ConnectionClosed(Exception):
  """The peer closed the connection (``partial``: in the middle of a frame)."""

  def __init__(self, partial: bool = False):
    self.partial = partial
    super().__init__("connection closed" + (" mid-frame" if partial else ""))


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
  """One frame's bytes."""
  head = json.dumps(header, separators=(",", ":")).encode()
  return _PREFIX.pack(MAGIC, len(head), len(payload)) + head + payload


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
  sock.sendall(encode_frame(header, payload))


def _recv_exact(sock: socket.socket, n: int, deadline: float, started: bool) -> bytes:
  """``n`` bytes by ``deadline``; waits with poll, so the socket's own timeout (the send
  deadline of ``hybrid.connections``) is left alone."""
  buf = bytearray()
  while len(buf) < n:
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not wait_readable(sock, remaining):
      raise FramingError(TIMEOUT, f"frame incomplete: {len(buf)} of {n} bytes by the deadline")
    chunk = sock.recv(min(n - len(buf), 1 << 20))
    if not chunk:
      raise ConnectionClosed(partial=started or bool(buf))
    buf += chunk
  return bytes(buf)


def recv_frame(
  sock: socket.socket,
  *,
  max_payload: int,
  timeout_s: float = 10.0,
  max_header: int = MAX_HEADER_BYTES,
) -> tuple[dict[str, Any], bytes]:
  """Reads one frame; the whole frame must arrive within ``timeout_s``.

  Raises:
    ConnectionClosed: EOF (before or inside the frame).
    FramingError: bad magic, a length over ``max_header`` / ``max_payload`` (raised before the
      body is read), or ``timeout``: the frame was not whole within ``timeout_s``.
    RequestError: ``malformed``, a whole frame whose header is not a JSON object (see
      ``parse_header``); the stream is still in sync.
  """
  deadline = time.monotonic() + timeout_s
  prefix = _recv_exact(sock, PREFIX_BYTES, deadline, started=False)
  magic, head_len, payload_len = _PREFIX.unpack(prefix)
  if magic != MAGIC:
    raise FramingError(MALFORMED, f"bad frame magic {magic!r} (expected {MAGIC!r})")
  if head_len > max_header:
    raise FramingError(OVERSIZED, f"header of {head_len} bytes exceeds the cap of {max_header}")
  if payload_len > max_payload:
    raise FramingError(
      OVERSIZED, f"payload of {payload_len} bytes exceeds the cap of {max_payload}"
    )
  head = _recv_exact(sock, head_len, deadline, started=True)
  payload = _recv_exact(sock, payload_len, deadline, started=True) if payload_len else b""
  return parse_header(head), payload


def parse_header(head: bytes) -> dict[str, Any]:
  """A header's bytes as a JSON object at most ``MAX_HEADER_DEPTH`` deep.

  Raises:
    RequestError: ``malformed`` for anything else: not UTF-8, not JSON, JSON the decoder refuses
      (``RecursionError`` from deep nesting, ``ValueError`` from an over-long integer), nested too
      deep, not an object. Nothing else escapes.
  """
  try:
    header = json.loads(head.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError are ValueErrors
    raise RequestError(MALFORMED, f"header is not UTF-8 JSON ({type(e).__name__}: {e})") from None
  if not isinstance(header, dict):
    raise RequestError(MALFORMED, f"header must be a JSON object, got {type(header).__name__}")
  # Iterative, so no later repr or json.dumps of a header value can recurse deeply.
  stack = [(header, 1)]
  while stack:
    value, depth = stack.pop()
    if depth > MAX_HEADER_DEPTH:
      raise RequestError(MALFORMED, f"header nested deeper than {MAX_HEADER_DEPTH} levels")
    children = value.values() if isinstance(value, dict) else value
    stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
  return header


def request_id(header: Any) -> str | None:
  """The header's ``id`` as text to echo back (a string or number, at most ``MAX_ID_CHARS``);
  None for anything else."""
  v = header.get("id") if isinstance(header, dict) else None
  if isinstance(v, str | int | float) and not isinstance(v, bool):
    return str(v)[:MAX_ID_CHARS]
  return None


def wait_readable(sock: socket.socket, timeout_s: float) -> bool:
  """True once ``sock`` has bytes (or EOF, or an error) to read, False after ``timeout_s``.

  ``poll``, not ``select``: a server with hundreds of connections may hold descriptors past
  ``select``'s limit of 1024.
  """
  poller = select.poll()
  poller.register(sock, select.POLLIN | select.POLLPRI)
  return bool(poller.poll(max(0, math.ceil(timeout_s * 1000))))


# ------------------------------------------------------------------------------------------------
# Arrays and fields.


def array_header(x: np.ndarray) -> dict[str, Any]:
  return {"shape": list(x.shape), "dtype": str(x.dtype)}


def array_bytes(x: np.ndarray) -> bytes:
  """Little-endian C-order bytes of a float32 array."""
  return np.ascontiguousarray(x, dtype="<f4").tobytes()


def decode_array(header: dict[str, Any], payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
  """The float32 array of a frame, checked against the expected ``shape``.

  Raises:
    RequestError: BAD_DTYPE, BAD_SHAPE (the header's shape, or a payload size that does not match
      it) or BAD_VALUE (NaN / inf).
  """
  if header.get("dtype") != "float32":
    raise RequestError(BAD_DTYPE, f"array dtype must be 'float32', got {show(header.get('dtype'))}")
  got = header.get("shape")
  if not isinstance(got, list) or got != list(shape):
    raise RequestError(BAD_SHAPE, f"array shape must be {list(shape)}, got {show(got)}")
  want = math.prod(shape) * 4
  if len(payload) != want:
    raise RequestError(
      BAD_SHAPE, f"payload of {len(payload)} bytes does not hold a float32 {list(shape)} ({want})"
    )
  x = np.frombuffer(payload, dtype="<f4").reshape(shape).astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise RequestError(BAD_VALUE, "array holds NaN or inf")
  return x


def get_float(header: dict[str, Any], name: str, lo: float, hi: float) -> float:
  """A finite number in [lo, hi]."""
  v = header.get(name)
  if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
    raise RequestError(BAD_FIELD, f"field {name!r} must be a finite number, got {show(v)}")
  if not lo <= v <= hi:
    raise RequestError(BAD_FIELD, f"field {name!r} must lie in [{lo}, {hi}], got {v}")
  return float(v)


def get_key(header: dict[str, Any], words: int) -> np.ndarray:
  """The request's PRNG key data: ``words`` uint32 values."""
  v = header.get("key")
  if (
    not isinstance(v, list)
    or len(v) != words
    or not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < 2**32 for w in v)
  ):
    raise RequestError(
      BAD_FIELD, f"field 'key' must be a list of {words} uint32 values, got {show(v)}"
    )
  return np.asarray(v, np.uint32)


def error_header(err: ProtocolError, **extra) -> dict[str, Any]:
  return {"type": "error", "code": err.code, "message": err.message, **extra}
