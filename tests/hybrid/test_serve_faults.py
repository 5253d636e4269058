"""hybrid.serve against faulty peers (``hybrid.connections``): idle sockets past the connection cap,
headers that do not parse, frames that stall or trickle. Loopback only, with timeouts of a second
or less, so each test takes a few seconds; a device served afterwards is checked against
``hybrid_sample`` as in ``test_serve.py``.
"""

import json
import socket
import struct
import time

import pytest

from hybrid import device, protocol
from tests.hybrid.test_serve import (
  _check_against_hybrid_sample,
  _request,
  _server,
  _specs,
  tiny_setup,
)


@pytest.fixture(scope="module")
def tiny():
  return tiny_setup()


def _raw(head: bytes, payload: bytes = b"") -> bytes:
  """A frame around any header bytes."""
  return struct.pack("!4sII", protocol.MAGIC, len(head), len(payload)) + head + payload


def _reply(sock: socket.socket) -> dict:
  return protocol.recv_frame(sock, max_payload=1 << 16, timeout_s=10.0)[0]


def _closed_by_server(sock: socket.socket) -> bool:
  sock.settimeout(5.0)
  try:
    return sock.recv(1) == b""
  except ConnectionResetError:
    return True


def _run_device(tiny, address, prefix: str, seed: int):
  models = tiny[0]
  specs = _specs(tiny, 1, prefix=prefix, seed=seed)
  results = device.run_clients(
    address, specs, num_steps=models.num_timesteps, pace=False, timeout=30
  )
  return specs, results


def test_idle_connections_cannot_hold_the_connection_cap(tiny):
  cap, idle_s, window = 3, 1.0, 1.5
  with _server(tiny, max_connections=cap, idle_timeout=idle_s, window=window) as server:
    idle = [socket.create_connection(server.address, timeout=10) for _ in range(cap + 2)]
    opened = time.monotonic()
    try:
      # The idle ones hold every slot: one more connection is refused at once.
      for s in idle[cap:]:
        assert _reply(s)["code"] == protocol.BUSY
        assert _closed_by_server(s)
      # Each idle one is told and closed once it has said nothing for idle_timeout.
      for s in idle[:cap]:
        head = _reply(s)
        assert head["code"] == protocol.TIMEOUT and "idle" in head["message"], head
        assert _closed_by_server(s)
      assert 0.8 * idle_s <= time.monotonic() - opened < idle_s + 5.0
      # The slots are free again. The device waits longer than the idle timeout for its answer
      # (the window alone is 1.5 s) and is not taken for idle while its request is pending.
      specs, results = _run_device(tiny, server.address, "late", seed=7)
    finally:
      for s in idle:
        s.close()
  _check_against_hybrid_sample(tiny[0], specs, results)
  assert results[0].answered - results[0].sent >= window
  assert [e["code"] for e in server.errors] == [protocol.TIMEOUT] * cap


def _deep(n: int) -> bytes:
  return b"[" * n + b"]" * n


def test_headers_that_do_not_parse_are_answered_and_the_reader_survives(tiny):
  spec = _specs(tiny, 1, prefix="dev", seed=8)[0]
  payload = protocol.array_bytes(spec["x_T"])

  def req(**over) -> bytes:
    return json.dumps(_request(spec, **over)).encode()

  no_id = json.dumps({k: v for k, v in _request(spec).items() if k != "id"}).encode()
  cases = {
    # The measured failure: a RecursionError in json.loads killed the reader, no reply.
    "nested_brackets": (b"[" * protocol.MAX_HEADER_BYTES, b"", protocol.MALFORMED),
    # Parses, but a repr or json.dumps of it (an echoed id) would recurse in the reader.
    "deep_id": (no_id[:-1] + b',"id":' + _deep(900) + b"}", payload, protocol.MALFORMED),
    "deep_shape": (req(shape=json.loads(_deep(8))), payload, protocol.MALFORMED),
    "long_int": (b'{"type":"request","user":' + b"9" * 5000 + b"}", b"", protocol.MALFORMED),
    "bad_utf8": (b'{"type":"request","id":"\xff\xfe"}', payload, protocol.MALFORMED),
    "not_json": (b"{nope", b"", protocol.MALFORMED),
    "not_object": (b"[1, 2, 3]", payload, protocol.MALFORMED),
    "empty": (b"", b"", protocol.MALFORMED),
    "type_list": (req(type=["request"]), payload, protocol.BAD_TYPE),
    "user_str": (req(user="0"), payload, protocol.BAD_FIELD),
    "user_bool": (req(user=True), payload, protocol.BAD_FIELD),
    "tau_nan": (req(tau=float("nan")), payload, protocol.BAD_FIELD),
    "alpha_str": (req(alpha="0.1"), payload, protocol.BAD_FIELD),
    "key_floats": (req(key=[0.5, 1.5]), payload, protocol.BAD_FIELD),
    "shape_str": (req(shape="8x8"), payload, protocol.BAD_SHAPE),
  }
  with _server(tiny) as server:
    # Every case on one connection: each is answered and the stream stays in sync.
    with socket.create_connection(server.address, timeout=10) as s:
      for name, (head, body, code) in cases.items():
        s.sendall(_raw(head, body))
        reply = _reply(s)
        assert reply["type"] == "error" and reply["code"] == code, (name, reply)
        assert len(reply["message"]) < 1000, name
      assert reply["id"] == spec["request_id"]  # a plain id is echoed
      # The same reader takes a valid request next.
      s.sendall(protocol.encode_frame(_request(spec), payload))
      assert _reply(s)["type"] in ("latent", "local")
    # Over the header cap: refused from the prefix, then closed; the refusal still arrives
    # although the device sent the whole (unread) header.
    with socket.create_connection(server.address, timeout=10) as s:
      s.sendall(_raw(b" " * (protocol.MAX_HEADER_BYTES + 1)))
      assert _reply(s)["code"] == protocol.OVERSIZED
      assert _closed_by_server(s)
    specs, results = _run_device(tiny, server.address, "after", seed=9)
  _check_against_hybrid_sample(tiny[0], specs, results)
  want = [code for _, _, code in cases.values()] + [protocol.OVERSIZED]
  assert [e["code"] for e in server.errors] == want


@pytest.mark.parametrize(
  "head",
  [b"[" * 20000, _deep(990), b"1" * 5000, b"\xc3\x28", b"null", b'"x"', b'{"a":' + _deep(9) + b"}"],
)
def test_parse_header_raises_only_malformed(head):
  with pytest.raises(protocol.RequestError) as e:
    protocol.parse_header(head)
  assert e.value.code == protocol.MALFORMED


def test_stalled_and_trickled_frames_are_closed_at_the_frame_deadline(tiny):
  bad = _specs(tiny, 1, prefix="slow", seed=10)[0]
  frame = protocol.encode_frame(_request(bad), protocol.array_bytes(bad["x_T"]))
  deadline = 0.5
  with _server(tiny, frame_timeout=deadline, idle_timeout=30.0) as server:
    # Stalls: the prefix and a few header bytes, then nothing.
    with socket.create_connection(server.address, timeout=10) as s:
      s.sendall(frame[: protocol.PREFIX_BYTES + 5])
      t0 = time.monotonic()
      head = _reply(s)
      took = time.monotonic() - t0
      assert head["code"] == protocol.TIMEOUT, head
      assert deadline - 0.1 <= took < deadline + 3.0
      assert _closed_by_server(s)
    # Trickles: one byte every 50 ms keeps the connection busy but never completes the frame
    # within the deadline (the frame is ~500 bytes).
    with socket.create_connection(server.address, timeout=10) as s:
      t0 = time.monotonic()
      for i in range(len(frame)):
        if protocol.wait_readable(s, 0.05) or time.monotonic() - t0 > 10.0:
          break
        s.sendall(frame[i : i + 1])
      head = _reply(s)
      took = time.monotonic() - t0
      assert head["code"] == protocol.TIMEOUT, head
      assert deadline - 0.1 <= took < deadline + 3.0
      assert _closed_by_server(s)
    specs, results = _run_device(tiny, server.address, "after", seed=11)
  _check_against_hybrid_sample(tiny[0], specs, results)
  assert [e["code"] for e in server.errors] == [protocol.TIMEOUT] * 2
