"""Error codes and the two protocol-error families shared by every protocol.

Every sans-I/O protocol in this package (dial, and later postgres, mysql,
mongodb) raises exactly two kinds of exception, as h11 does:

* :class:`LocalProtocolError`: *we* broke the protocol (sent something out of
  turn, built an event that cannot be encoded). A bug on our side, or a
  caller using the API wrongly; nothing was put on the wire.
* :class:`RemoteProtocolError`: the *peer* broke it (malformed bytes, a frame
  out of turn, more data than the protocol allows). The connection object that
  raised it is poisoned; the caller answers with a typed refusal if the
  protocol has one, then closes.

Both carry an :class:`ErrorCode`, the one vocabulary the cluster, the gateway
and the dial wire share, and an optional free-form ``wire_hint`` for the
protocol-native rendering of the error (a SQLSTATE, a MySQL error number, a
MongoDB error code, an SSH disconnect reason), so the layer that talks to the
end user never has to guess.

Messages must never carry secrets or echo large chunks of peer input: they end
up in logs and, via refusals, on the other end of the wire.
"""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "ProtocolError", "LocalProtocolError", "RemoteProtocolError"]


class ErrorCode(enum.Enum):
    """Why a dial (or any protocol exchange) failed.

    The values are the exact strings used on the dial wire; adding a member is
    a backwards-compatible change (older receivers map unknown strings to
    ``INTERNAL_ERROR``), renaming one is not.
    """

    ACCESS_DENIED = "access_denied"
    RESOURCE_NOT_FOUND = "resource_not_found"
    CERT_EXPIRED = "cert_expired"
    CERT_INVALID = "cert_invalid"
    CERT_REQUIRED = "cert_required"
    USER_LOCKED = "user_locked"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(Exception):
    """Base class of both families; catch this to handle either.

    Attributes:
        code: the :class:`ErrorCode` that best describes the failure.
        message: a human-readable explanation (also ``str(exc)``).
        wire_hint: protocol-specific rendering hint (e.g. a SQLSTATE string or
            a numeric error code), or ``None`` to let the renderer pick one
            from ``code``.

    Not meant to be raised directly: which side broke the protocol is the
    single most useful fact about a protocol error, so it is always stated.
    """

    #: The code used when the raiser does not name one.
    default_code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        wire_hint: str | int | None = None,
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        if code is None:
            code = self.default_code
        if not isinstance(code, ErrorCode):
            raise TypeError(f"code must be an ErrorCode, not {type(code).__name__}")
        super().__init__(message)
        self.message = message
        self.code = code
        self.wire_hint = wire_hint

    def __repr__(self) -> str:
        hint = "" if self.wire_hint is None else f", wire_hint={self.wire_hint!r}"
        return f"{type(self).__name__}({self.message!r}, code={self.code}{hint})"

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only arguments are not in ``self.args``, so the default
        # pickling would rebuild the error with its default code. Errors cross
        # process boundaries in tests and worker pools; keep them whole.
        return (_rebuild, (type(self), self.message, self.code, self.wire_hint))


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids; nothing was sent."""

    default_code = ErrorCode.INTERNAL_ERROR


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; the connection object is now poisoned."""

    default_code = ErrorCode.BAD_REQUEST


def _rebuild(
    cls: type[ProtocolError], message: str, code: ErrorCode, wire_hint: str | int | None
) -> ProtocolError:
    return cls(message, code=code, wire_hint=wire_hint)
