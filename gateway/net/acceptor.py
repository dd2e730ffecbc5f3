"""Connections the relay engine opens and accepts itself, in its own
thread, so that a new session costs no trip through trio: a listening
socket (:class:`_Listener`, :meth:`RelayEngine.listen`) and a non-blocking
connect (:class:`_Connecting`, :meth:`RelayEngine.connect`)."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from gateway.net.descriptors import ACCEPT_STARVED, Starvation
from gateway.net.ends import _IN, End, reset_and_close

if TYPE_CHECKING:
    from gateway.net.engine import RelayEngine

__all__ = ["ACCEPT_BATCH"]

log = logging.getLogger(__name__)

#: Connections one listener accepts per turn of the loop.
ACCEPT_BATCH = 64


class _Listener:
    """A listening socket the engine accepts on (:meth:`RelayEngine.listen`)."""

    def __init__(self, engine: "RelayEngine", sock: socket.socket, on_accept) -> None:
        self.engine = engine
        self.on_accept = on_accept
        sock.setblocking(False)
        self.end = End(sock, "listener", None, None)
        self.end.owner = self
        self.closed = False
        self.starved = Starvation("relay engine")

    def on_ready(self, end: End, ev: int) -> None:
        accept = end.sock.accept
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_STARVED:
                    # Out of descriptors or memory: stop accepting for a
                    # moment (level-triggered epoll would spin); the clients
                    # wait in the backlog. One log line per episode.
                    self.engine.set_mask(end, 0)
                    self.engine.call_later(self.starved.failed(exc), self._resume)
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            self.starved.accepted()
            sock.setblocking(False)
            try:
                self.on_accept(sock, addr)
            except Exception:
                log.exception("accept_handler_failed action=report this as a bug with the traceback")
                reset_and_close(sock)  # cut short, not ended

    def _resume(self) -> None:
        if not self.closed:
            self.engine.set_mask(self.end, _IN)

    def close(self) -> None:
        """Stop accepting and close the socket (any thread)."""
        with self.engine.lock:
            if self.closed:
                return
            self.closed = True
            self.engine.forget(self.end)
            self.end.sock.close()
            self.end.owner = None


class _Connecting:
    """A non-blocking connect in progress (:meth:`RelayEngine.connect`)."""

    def __init__(self, engine: "RelayEngine", sock: socket.socket, done, timeout: float) -> None:
        self.engine = engine
        self.done = done
        self.end = End(sock, "connecting", None, None)
        self.end.owner = self
        self.timer = engine.call_later(timeout, self._timed_out)

    def on_ready(self, end: End, ev: int) -> None:
        err = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._end(None, os.strerror(err))
            return
        try:
            end.sock.getpeername()
        except OSError:
            # Not connected yet, and no error: a stale event (meant for a
            # socket closed earlier in this batch whose descriptor this one
            # reuses). Keep waiting for the real one.
            return
        self._end(end.sock, None)

    def _timed_out(self) -> None:
        self._end(None, "timed out")

    def cancel(self, reason: str) -> None:
        """Give up now (any thread): ``done(None, reason)``, unless it is
        done already."""
        with self.engine.lock:
            self._end(None, reason)

    def _end(self, sock: socket.socket | None, error: str | None) -> None:
        end, done = self.end, self.done
        if done is None:
            return
        self.done = None
        self.timer.cancel()
        self.engine.forget(end)
        end.owner = None
        if sock is None:
            end.sock.close()
        try:
            done(sock, error)
        except Exception:
            log.exception("connect_callback_failed action=report this as a bug with the traceback")
