"""TLS 1.3 key updates, which the stdlib ``ssl`` module cannot ask for.

Why. TLS 1.3 with AES-GCM may protect at most 2^24.5 records with one key
(RFC 8446 section 5.5: about 24 million; its successor makes updating or
closing before then a MUST), and OpenSSL does not update keys by itself
(openssl/openssl#23566). Wicket's multiplexed connection lives for days and
carries every session of a gateway, one record per small message: at 10,000
messages a second it would pass the limit in 40 minutes. The relay engine
(gateway/net/engine.py) therefore counts the records it writes on each TLS
connection and asks OpenSSL for a key update every :data:`UPDATE_AFTER`
records; the KeyUpdate message goes out in front of the next record. Each
side updates its own sending key: the peer, when it is Wicket, counts its
own records.

How. An ``ssl.SSLObject`` keeps its OpenSSL ``SSL *`` in the C object behind
it (``_ssl._SSLSocket``, CPython's private ``PySSLSocket``), and no Python
API hands it out. :func:`key_updater` reads it from there with ctypes, but
only once the layout is confirmed by what is known independently: the
struct's context pointer must be the address of the object's own
``SSLContext``, and OpenSSL must agree that this ``SSL`` belongs to that
context's ``SSL_CTX`` (itself read from the context's struct). Any mismatch
(another interpreter, another layout) and there is no updater: such a
connection is ended instead at its first write once it has written
:data:`MAX_RECORDS` records (past it by one write's records at most, far
below the limit), and the log says why. The function is looked up through the ``_ssl`` module's own
handle, so it comes from the very libssl that made the ``SSL``.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from typing import Callable

__all__ = ["MAX_RECORDS", "NEVER", "UPDATE_AFTER", "KeysWornOut", "key_updater", "record_shift", "records",
           "rekey"]

log = logging.getLogger(__name__)

#: Records written under one key before a new one is asked for: a quarter
#: of the limit, so that an update is never late (it costs a few hash
#: computations and one small record).
UPDATE_AFTER = 1 << 22
#: Records a connection that cannot update its keys may write; it is ended
#: before it writes more (the limit is 2^24.5).
MAX_RECORDS = 1 << 24
#: ``rekey_at`` of a connection without that limit.
NEVER = sys.maxsize

_TLS1_3_VERSION = 0x0304
_SSL_KEY_UPDATE_NOT_REQUESTED = 0
_SHIFT = 14  # log2 of the plaintext a record carries at most: 16 KiB
_MFL_SHIFT = {1: 9, 2: 10, 3: 11, 4: 12}  # max_fragment_length codes: 512 ... 4096 bytes


def records(n: int, shift: int = _SHIFT) -> int:
    """Records counted for writing ``n`` bytes (n > 0): never fewer than
    OpenSSL makes (one more for an exact multiple: the relay's hot path
    computes it as ``(n >> shift) + 1``)."""
    return (n >> shift) + 1


class KeysWornOut(Exception):
    """A connection that cannot update its keys wrote as many records as
    one key may protect: it must end."""


def rekey(state, obj: ssl.SSLObject, name: str) -> None:
    """``state`` (anything with the counters ``records``, ``rekey_at`` and
    ``key_update``, as the relay engine's ends and TLSStream have) wrote
    ``rekey_at`` records under ``obj``'s current key: have the next record
    go out under a new one. Call it right before writing that record:
    OpenSSL holds the connection "in init" until the KeyUpdate is written,
    and a close_notify asked for meanwhile would fail
    (SHUTDOWN_WHILE_IN_INIT).

    Each side updates its own sending key (the peer's is its business: a
    Wicket peer counts its own records). TLS 1.2 (a local PostgreSQL client
    or server may speak it; it has no KeyUpdate) and ChaCha20 (whose limit
    is out of reach) are left alone. Where an update cannot be asked for,
    raise :class:`KeysWornOut` once the count reaches :data:`MAX_RECORDS`
    (``name`` says which connection, in the log line and the error)."""
    if state.key_update is None:
        if obj.version() != "TLSv1.3" or "CHACHA20" in (obj.cipher() or ("",))[0]:
            state.key_update = False
            state.rekey_at = NEVER
            return
        state.key_update = key_updater(obj) or False
        if not state.key_update:
            log.warning("tls_key_update_unavailable side=%s action=%r", name,
                        f"this Python's ssl module does not let Wicket update TLS keys; the connection ends "
                        f"after {MAX_RECORDS} records, before its key wears out, and is opened anew")
    if state.key_update:
        try:
            state.key_update()
        except ssl.SSLError as exc:  # never seen on a healthy connection: try again later
            log.warning("tls_key_update_refused side=%s records=%d error=%r", name, state.records, str(exc))
        else:
            log.debug("tls_key_update side=%s records=%d", name, state.records)
            state.records = 0
            state.rekey_at = UPDATE_AFTER
            return
    if state.records >= MAX_RECORDS:
        raise KeysWornOut(f"{name}: the connection wrote {state.records} TLS records under one key, as many as "
                          f"it may, and could not get a new key; it was ended")
    state.rekey_at = min(MAX_RECORDS, state.records + UPDATE_AFTER // 4) if state.key_update else MAX_RECORDS


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        for name, restype, argtypes in (
            ("SSL_key_update", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            ("SSL_get_SSL_CTX", ctypes.c_void_p, [ctypes.c_void_p]),
            ("SSL_version", ctypes.c_int, [ctypes.c_void_p]),
            ("SSL_get_session", ctypes.c_void_p, [ctypes.c_void_p]),
            ("SSL_SESSION_get_max_fragment_length", ctypes.c_uint8, [ctypes.c_void_p]),
            ("ERR_get_error", ctypes.c_ulong, []),
            ("ERR_clear_error", None, []),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        return lib
    except (OSError, AttributeError):
        return None


_lib = _load()


def _ssl_pointer(obj: ssl.SSLObject) -> tuple[object, int] | None:
    """(the C object behind ``obj``, its ``SSL *``), or None if they cannot
    be found safely (see the module docstring)."""
    c = getattr(obj, "_sslobj", None)
    if _lib is None or type(c) is not getattr(ssl._ssl, "_SSLSocket", None):  # type: ignore[attr-defined]
        return None
    context = c.context
    word = ctypes.sizeof(ctypes.c_void_p)
    head = object.__basicsize__  # PyObject_HEAD, whatever this build puts in it
    # PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl, PySSLContext *ctx, ...
    # PySSLContext: PyObject_HEAD, SSL_CTX *ctx, ...
    # Nothing read here is followed before the context pointer matches.
    if ctypes.c_void_p.from_address(id(c) + head + 2 * word).value != id(context):
        return None
    ssl_ptr = ctypes.c_void_p.from_address(id(c) + head + word).value
    ctx_ptr = ctypes.c_void_p.from_address(id(context) + head).value
    if not ssl_ptr or not ctx_ptr or _lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return None
    return c, ssl_ptr


def record_shift(obj: ssl.SSLObject) -> int:
    """log2 of the plaintext one record carries at most on ``obj`` (after its
    handshake): 14 (16 KiB), less where the client negotiated a smaller
    max_fragment_length (RFC 6066; OpenSSL honours it in TLS 1.3 too)."""
    found = _ssl_pointer(obj)
    if found is None:
        return _SHIFT
    session = _lib.SSL_get_session(found[1])
    return _MFL_SHIFT.get(_lib.SSL_SESSION_get_max_fragment_length(session), _SHIFT) if session else _SHIFT


def key_updater(obj: ssl.SSLObject) -> Callable[[], None] | None:
    """A function that asks OpenSSL to update ``obj``'s sending key in front
    of the next record written (raising ``ssl.SSLError``, with OpenSSL's
    error queue left clean, if it refuses); None if that cannot be done
    safely here, or the connection is not TLS 1.3. Call it only where
    ``obj`` is written, never concurrently with that."""
    found = _ssl_pointer(obj)
    if found is None:
        return None
    c, ssl_ptr = found
    if _lib.SSL_version(ssl_ptr) != _TLS1_3_VERSION:
        return None
    key_update, get_error, clear_errors = _lib.SSL_key_update, _lib.ERR_get_error, _lib.ERR_clear_error

    def update() -> None:
        if key_update(ssl_ptr, _SSL_KEY_UPDATE_NOT_REQUESTED) != 1:
            code = get_error()
            clear_errors()  # or the next call on this thread, for any connection, would report it
            raise ssl.SSLError(f"OpenSSL refused to schedule a TLS key update (error {code:#x})")

    update.ssl_object = c  # type: ignore[attr-defined]  # the SSL lives as long as this function
    return update
