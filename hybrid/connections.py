"""The edge server's device connections: one reader each, two deadlines, an answer to every frame.

``hybrid.edge.EdgeServer`` runs ``serve_connection`` in one thread per accepted connection (at
most ``max_connections`` of them, ``--max_connections``, default 256; one more is answered
``busy`` and closed). Two timeouts bound how long a connection holds its slot:

* **Frame deadline** (``frame_timeout``, ``--frame_timeout``, default ``FRAME_TIMEOUT_S`` = 5 s):
  once the first byte of a frame has arrived, the whole frame (prefix, header, payload) must
  arrive within it, however it trickles in; else the device gets a ``timeout`` error frame and the
  connection is closed. Answers going out have the same deadline (the socket's send timeout): a
  device that stops reading loses its connection and holds the batcher up at most that long.
* **Idle timeout** (``idle_timeout``, ``--idle_timeout``, default ``IDLE_TIMEOUT_S`` = 30 s): a
  connection with no request waiting for its answer that sends nothing for this long gets a
  ``timeout`` error frame and is closed. A device waiting for its answer (the window, the
  decision, the edge's steps) is never idle, however long that takes.

So a connection that says nothing holds a slot of the cap at most ``idle_timeout`` seconds, and
one that starts a frame and stalls at most ``frame_timeout`` more, each plus the reader's poll
(``POLL_S`` = 0.1 s): the slot is free once the connection is marked closed, before the closing
linger, so by the time the device reads EOF. A device that keeps sending whole frames is not
idle, whatever they hold: these deadlines bound silent and stalled peers, not busy ones.

Every frame that cannot be read or parsed is answered with an error frame (``hybrid.protocol``'s
codes): a whole frame with a bad header (not UTF-8, not JSON, nested too deep, not an object,
fields of the wrong type or range) is refused and the connection stays open and in sync; a broken
stream (bad magic, a length over a cap, the frame deadline) is refused and the connection closed.
Any other exception while reading or taking a frame is answered ``internal`` and closes that
connection alone. A connection is closed by shutting down its sending side after the last frame
and draining what the device still sends for at most ``LINGER_S``, so the refusal reaches a
device that was still writing (a close with unread bytes would reset the connection instead).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from hybrid import protocol

FRAME_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 256
POLL_S = 0.1  # how often a reader looks at the stop flag and its idle time
LINGER_S = 0.5


class Connection:
  """One device connection: serialized writes (the batcher and the reader both answer), the
  requests still waiting for their answer, and the time of its last traffic."""

  def __init__(self, sock: socket.socket, peer, send_timeout: float = FRAME_TIMEOUT_S):
    self.sock, self.peer = sock, peer
    sock.settimeout(send_timeout)  # bounds sendall; reads wait with poll (protocol.recv_frame)
    self.lock = threading.Lock()
    self.closed = threading.Event()
    self._pending: set[int] = set()
    self._active = time.monotonic()

  def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
    """False if the device is gone (its request is then lost to it alone)."""
    with self.lock:
      if self.closed.is_set():
        return False
      try:
        protocol.send_frame(self.sock, header, payload)
      except OSError:  # a send timeout too: the frame may be cut, so the stream is lost
        self.abort()
        return False
      self._active = time.monotonic()
      return True

  def expect(self, rid: int) -> None:
    """Request ``rid`` waits for its answer: the connection is not idle until it has it."""
    self._pending.add(rid)
    self._active = time.monotonic()

  def answer(self, rid: int, header: dict[str, Any], payload: bytes = b"") -> bool:
    """Sends request ``rid``'s answer (latent, local or error); it is no longer pending."""
    try:
      return self.send(header, payload)
    finally:
      self._pending.discard(rid)
      self._active = time.monotonic()

  def touch(self) -> None:
    self._active = time.monotonic()

  def idle_for(self, now: float) -> float:
    """Seconds since the last traffic; 0 while a request waits for its answer."""
    return 0.0 if self._pending else now - self._active

  def abort(self) -> None:
    """Ends the connection now (both directions); its reader sees EOF and closes it."""
    self.closed.set()
    try:
      self.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass

  def close(self, linger_s: float = LINGER_S) -> None:
    """Sends FIN after the last frame, drains the device's bytes for at most ``linger_s`` (one
    read if 0), then closes: the device reads our last frame instead of a reset."""
    try:
      with self.lock:  # after an answer being written; no send starts after this
        self.closed.set()
        self.sock.shutdown(socket.SHUT_WR)
      end = time.monotonic() + linger_s
      while protocol.wait_readable(self.sock, max(0.0, end - time.monotonic())):
        if not self.sock.recv(1 << 16) or time.monotonic() >= end:
          break
    except OSError:
      pass
    finally:
      self.closed.set()
      self.sock.close()


# on_frame(conn, header, payload) takes a whole frame, raising protocol.RequestError to refuse it;
# on_refused(conn, error, header or None) answers a refusal with an error frame (and records it).
OnFrame = Callable[[Connection, dict[str, Any], bytes], None]
OnRefused = Callable[[Connection, protocol.ProtocolError, Any], None]


def serve_connection(
  conn: Connection,
  *,
  stop: threading.Event,
  max_payload: int,
  frame_timeout: float,
  idle_timeout: float,
  on_frame: OnFrame,
  on_refused: OnRefused,
) -> None:
  """One connection's reader, until EOF, a broken stream, the idle timeout or ``stop``; then the
  connection is closed (lingering, see ``Connection.close``)."""
  try:
    while not (stop.is_set() or conn.closed.is_set()):
      if protocol.wait_readable(conn.sock, POLL_S):
        if not _take_frame(conn, max_payload, frame_timeout, on_frame, on_refused):
          break
        continue
      idle = conn.idle_for(time.monotonic())
      if idle > idle_timeout:
        msg = f"idle for {idle:.1f} s with no request pending (idle timeout {idle_timeout:g} s)"
        on_refused(conn, protocol.FramingError(protocol.TIMEOUT, msg), None)
        break
  except OSError:
    pass
  finally:
    # Any request still pending is lost to this device only; the batcher drops it.
    conn.close(0.0 if stop.is_set() else LINGER_S)


def _take_frame(
  conn: Connection, max_payload: int, frame_timeout: float, on_frame: OnFrame, on_refused: OnRefused
) -> bool:
  """Reads one frame and hands it on, answering any refusal; False once the connection must
  close."""
  header = None
  try:
    header, payload = protocol.recv_frame(
      conn.sock, max_payload=max_payload, timeout_s=frame_timeout
    )
    conn.touch()
    on_frame(conn, header, payload)
    return True
  except protocol.ConnectionClosed:
    return False
  except protocol.RequestError as e:  # a whole frame: the stream is in sync
    on_refused(conn, e, header)
    return True
  except protocol.FramingError as e:
    on_refused(conn, e, header)
    return False
  except OSError:
    return False
  except Exception as e:  # noqa: BLE001 -- a bug here costs this connection, not the reader
    logging.exception("edge connection %s: frame not handled", conn.peer)
    err = protocol.FramingError(protocol.INTERNAL, f"frame not handled ({type(e).__name__})")
    on_refused(conn, err, header)
    return False
