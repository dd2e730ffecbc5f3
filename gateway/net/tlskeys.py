"""TLS 1.3 key updates, which the stdlib ``ssl`` module cannot ask for.

Why. TLS 1.3 with AES-GCM may protect at most 2^24.5 records with one key
(RFC 8446 section 5.5: about 24 million; its successor makes updating or
closing before then a MUST), and OpenSSL does not update keys by itself
(openssl/openssl#23566). Wicket's multiplexed connection lives for days and
carries every session of a gateway, one record per small message: at 10,000
messages a second it would pass the limit in 40 minutes. The relay engine
(gateway/net/engine.py) therefore counts the records it writes on each TLS
connection and asks OpenSSL for a key update every :data:`UPDATE_AFTER`
records; the KeyUpdate message goes out in front of the next record, and,
since it requests one back, the peer updates its own sending key too.

How. An ``ssl.SSLObject`` keeps its OpenSSL ``SSL *`` in the C object behind
it (``_ssl._SSLSocket``, CPython's private ``PySSLSocket``), and no Python
API hands it out. :func:`key_updater` reads it from there with ctypes, but
only once the layout is confirmed by what is known independently: the
struct's context pointer must be the address of the object's own
``SSLContext``, and OpenSSL must agree that this ``SSL`` belongs to that
context's ``SSL_CTX`` (itself read from the context's struct). Any mismatch
(another interpreter, another layout) and there is no updater: the engine
then ends such a connection before it reaches :data:`MAX_RECORDS` instead,
and says why. The function is looked up through the ``_ssl`` module's own
handle, so it comes from the very libssl that made the ``SSL``.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
from typing import Callable

__all__ = ["MAX_RECORDS", "UPDATE_AFTER", "KeysWornOut", "key_updater", "rekey", "records"]

log = logging.getLogger(__name__)

#: Records written under one key before the engine asks for a new one:
#: a sixth of the limit, so that an update is never late (it costs a few
#: hash computations and one small record).
UPDATE_AFTER = 1 << 22
#: Records a connection that cannot update its keys may write; it is ended
#: before it writes more (the limit is 2^24.5).
MAX_RECORDS = 1 << 24

_TLS1_3_VERSION = 0x0304
_SSL_KEY_UPDATE_REQUESTED = 1
_RECORD = 16384  # plaintext bytes per TLS record at most


def records(n: int) -> int:
    """How many records writing ``n`` bytes (n > 0) takes."""
    return (n + _RECORD - 1) // _RECORD


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
    (SHUTDOWN_WHILE_IN_INIT). Where an update cannot be done, raise
    :class:`KeysWornOut` once it reaches :data:`MAX_RECORDS` (``name``
    says which connection, in the log line and the error). Raises
    ``ssl.SSLError`` if OpenSSL refuses."""
    if state.key_update is None:
        state.key_update = key_updater(obj) or False
        if not state.key_update:
            log.warning("tls_key_update_unavailable side=%s action=%r", name,
                        f"this Python's ssl module does not let Wicket update TLS keys; the connection ends "
                        f"after {MAX_RECORDS} records, before its key wears out, and is opened anew")
    if state.key_update:
        state.key_update()
        log.debug("tls_key_update side=%s records=%d", name, state.records)
        state.records = 0
        return
    if state.records >= MAX_RECORDS:
        raise KeysWornOut(f"{name}: the connection wrote {state.records} TLS records under one key, as many as "
                          f"it may, and could not ask for a new key; it was ended")
    state.rekey_at = MAX_RECORDS


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
        for name, restype, argtypes in (
            ("SSL_key_update", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            ("SSL_get_SSL_CTX", ctypes.c_void_p, [ctypes.c_void_p]),
            ("SSL_version", ctypes.c_int, [ctypes.c_void_p]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        return lib
    except (OSError, AttributeError):
        return None


_lib = _load()


def key_updater(obj: ssl.SSLObject) -> Callable[[], None] | None:
    """A function that asks OpenSSL to update ``obj``'s sending key (and
    the peer to update its own) in front of the next record written; None
    if that cannot be done safely here (see the module docstring). Call it
    only where ``obj`` is written, never concurrently with that."""
    c = getattr(obj, "_sslobj", None)
    if _lib is None or c is None:
        return None
    context = c.context
    word = ctypes.sizeof(ctypes.c_void_p)
    head = ctypes.sizeof(ctypes.c_ssize_t) + word  # PyObject_HEAD: refcount, type
    # PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl, PySSLContext *ctx, ...
    # PySSLContext: PyObject_HEAD, SSL_CTX *ctx, ...
    if ctypes.c_void_p.from_address(id(c) + head + 2 * word).value != id(context):
        return None
    ssl_ptr = ctypes.c_void_p.from_address(id(c) + head + word).value
    ctx_ptr = ctypes.c_void_p.from_address(id(context) + head).value
    if not ssl_ptr or not ctx_ptr or _lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
        return None
    if _lib.SSL_version(ssl_ptr) != _TLS1_3_VERSION:
        return None
    key_update = _lib.SSL_key_update

    def update(keep=c) -> None:  # ``keep``: the SSL lives as long as this function
        if key_update(ssl_ptr, _SSL_KEY_UPDATE_REQUESTED) != 1:
            raise ssl.SSLError("OpenSSL refused to schedule a TLS key update")

    return update
