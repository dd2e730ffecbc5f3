"""Logging in to a MongoDB server with SCRAM: the cluster's side, as the
``saslStart``/``saslContinue`` command bodies a driver sends.

Spec: mongodb/specifications ``source/auth/auth.md`` ("SCRAM-SHA-1",
"SCRAM-SHA-256"; the ``skipEmptyExchange`` option); RFC 5802, RFC 7677.

Theory of operation
-------------------
:class:`ScramLogin` is one conversation, sans-I/O: :meth:`~ScramLogin.start`
gives the ``saslStart`` body, and each server reply goes to
:meth:`~ScramLogin.step`, which gives the next body to send or None once
the server has proved it knows the password and said ``done``. The caller
wraps bodies in OP_MSGs (:class:`~protocols.mongodb.wire.OpMsg`) and reads
replies with a :class:`~protocols.mongodb.wire.MessageReader`.

The SCRAM exchange itself is :class:`protocols.scram.ScramClient`, shared
with PostgreSQL. What is MongoDB's own is the password: SCRAM-SHA-1 hashes
the hex MD5 digest of ``"<user>:mongo:<password>"`` (the server stores
that, not the password), SCRAM-SHA-256 the SASLprep'd password. A server
may want one more, empty, ``saslContinue`` after its signature (older
servers; we ask for ``skipEmptyExchange`` but accept either). A refusal
(``ok: 0``) or any misbehaviour raises :class:`ScramLoginError`, whose
``wire_hint`` is the server's code (AuthenticationFailed, 18, if it gave
none) so the cluster can answer its client in kind.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from typing import Any, Final

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.scram import DEFAULT_MAX_ITERATIONS, HASHES, ScramClient, ScramServer, saslprep

__all__ = ["MECHANISMS", "AUTHENTICATION_FAILED", "password_digest", "ScramLoginError",
           "ScramLogin", "LocalLogin"]

#: What this login speaks, the strongest first.
MECHANISMS: Final = ("SCRAM-SHA-256", "SCRAM-SHA-1")
AUTHENTICATION_FAILED: Final = 18


class ScramLoginError(RemoteProtocolError):
    """The server refused the login, or broke the SCRAM exchange."""

    def __init__(self, message: str, *, wire_hint: int = AUTHENTICATION_FAILED) -> None:
        super().__init__(message, code=ErrorCode.UPSTREAM_UNREACHABLE, wire_hint=wire_hint)


def password_digest(username: str, password: str) -> str:
    """MongoDB's SCRAM-SHA-1 password: hex MD5 of ``user:mongo:password``."""
    return hashlib.md5(f"{username}:mongo:{password}".encode("utf-8")).hexdigest()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # int32 or Int64


class _Step(enum.Enum):
    START = "START"  # nothing sent yet
    FIRST_SENT = "FIRST_SENT"  # saslStart sent: the server's first message is due
    FINAL_SENT = "FINAL_SENT"  # our proof sent: the server's signature is due
    EMPTY_SENT = "EMPTY_SENT"  # the empty saslContinue sent: done is due
    DONE = "DONE"
    FAILED = "FAILED"


class ScramLogin:
    """One SCRAM login as ``username`` against ``source`` (the database
    the user is defined in, ``admin`` by default); see the module doc."""

    def __init__(self, *, username: str, password: str, mechanism: str = "SCRAM-SHA-256",
                 source: str = "admin", nonce: str | None = None,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS) -> None:
        if mechanism not in HASHES:
            raise ValueError(f"MongoDB SCRAM is one of {', '.join(MECHANISMS)}, "
                             f"not {mechanism!r}")
        if mechanism == "SCRAM-SHA-1":
            prepared = password_digest(username, password)
        else:
            prepared = saslprep(password)  # ValueError: a password SASLprep refuses
        self.mechanism = mechanism
        self._source = source
        self._scram = ScramClient(prepared.encode("utf-8"), mechanism=mechanism,
                                  username=username, nonce=nonce,
                                  max_iterations=max_iterations, error=ScramLoginError)
        self._step = _Step.START
        self._conversation: Any = None

    def __repr__(self) -> str:
        return f"<ScramLogin {self.mechanism} {self._step.name}>"

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def start(self) -> dict[str, Any]:
        """The ``saslStart`` command body."""
        if self._step is not _Step.START:
            raise LocalProtocolError("a SCRAM login starts once")
        self._step = _Step.FIRST_SENT
        return {"saslStart": 1, "mechanism": self.mechanism,
                "payload": self._scram.client_first(), "autoAuthorize": 1,
                "options": {"skipEmptyExchange": True}, "$db": self._source}

    def step(self, reply: Mapping[str, Any]) -> dict[str, Any] | None:
        """The next command body for the server's ``reply``, or None when
        logged in. Raises ScramLoginError for a refusal or a bad reply."""
        step = self._step
        if step in (_Step.START, _Step.DONE, _Step.FAILED):
            raise LocalProtocolError(f"no SCRAM reply is due (at {step.name})")
        self._step = _Step.FAILED  # until this reply proves good
        if not reply.get("ok"):
            code = reply.get("code")
            errmsg = reply.get("errmsg")
            raise ScramLoginError(
                f"the server refused the login: {errmsg if isinstance(errmsg, str) else ''}"[:512],
                wire_hint=int(code) if _is_int(code) else AUTHENTICATION_FAILED)
        done = reply.get("done")
        if type(done) is not bool:
            raise ScramLoginError("a SASL reply has no boolean 'done'")
        if step is _Step.EMPTY_SENT:
            if not done:
                raise ScramLoginError("the server goes on after SCRAM is over")
            self._step = _Step.DONE
            return None
        payload = reply.get("payload")
        if not isinstance(payload, bytes):
            raise ScramLoginError("a SASL reply has no binary payload")
        if step is _Step.FIRST_SENT:
            if done:
                raise ScramLoginError("the server ended SCRAM before our proof")
            conversation = reply.get("conversationId")
            if not _is_int(conversation):
                raise ScramLoginError("a SASL reply has no integer conversationId")
            self._conversation = conversation
            final = self._scram.client_final(payload)
            self._step = _Step.FINAL_SENT
            return self._continue(final)
        self._scram.verify_server_final(payload)  # FINAL_SENT
        if done:
            self._step = _Step.DONE
            return None
        self._step = _Step.EMPTY_SENT
        return self._continue(b"")

    def _continue(self, payload: bytes) -> dict[str, Any]:
        return {"saslContinue": 1, "conversationId": self._conversation, "payload": payload,
                "$db": self._source}


#: PBKDF2 rounds of the local credential (a server's defaults).
_LOCAL_ITERATIONS: Final = {"SCRAM-SHA-256": 15000, "SCRAM-SHA-1": 10000}


class LocalLogin:
    """The server side of one SCRAM login against a single local credential
    (``username``/``password``): a gateway that lets a client which insists
    on logging in do so with the credential it printed. :meth:`answer` takes
    each ``saslStart``/``saslContinue`` body and gives the reply body;
    :attr:`done` once the client has proved it knows the password. Any
    other user, a wrong password or a broken exchange gets
    AuthenticationFailed (18), the same for all, and ends the login."""

    def __init__(self, *, username: str, password: str, salt: bytes, nonce: str | None = None) -> None:
        self._username, self._password, self._salt, self._nonce = username, password, salt, nonce
        self._server: ScramServer | None = None
        self._skip_empty = False
        self._step = _Step.START

    @property
    def done(self) -> bool:
        return self._step is _Step.DONE

    def _failed(self, errmsg: str, code: int = AUTHENTICATION_FAILED,
                name: str = "AuthenticationFailed") -> dict[str, Any]:
        self._step = _Step.FAILED
        return {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": name}

    def answer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        command = next(iter(body), None)
        payload = body.get("payload")
        if command == "saslStart" and self._step is _Step.START:
            mechanism = body.get("mechanism")
            if mechanism not in _LOCAL_ITERATIONS:
                return self._failed(f"this proxy's local login speaks {', '.join(MECHANISMS)}, "
                                    f"not {str(mechanism)[:32]!r}", 334, "MechanismUnavailable")
            options = body.get("options")
            self._skip_empty = isinstance(options, Mapping) and options.get("skipEmptyExchange") is True
            prepared = (password_digest(self._username, self._password) if mechanism == "SCRAM-SHA-1"
                        else saslprep(self._password))
            self._server = ScramServer(prepared.encode("utf-8"), mechanism=mechanism, salt=self._salt,
                                       iterations=_LOCAL_ITERATIONS[mechanism], nonce=self._nonce,
                                       error=ScramLoginError)
            try:
                first = self._server.server_first(payload if isinstance(payload, bytes) else b"")
            except ScramLoginError:
                return self._failed("Authentication failed.")
            self._step = _Step.FIRST_SENT
            return {"conversationId": 1, "done": False, "payload": first, "ok": 1.0}
        if command != "saslContinue" or body.get("conversationId") != 1 or not isinstance(payload, bytes):
            return self._failed("Authentication failed.")
        if self._step is _Step.FIRST_SENT:
            assert self._server is not None
            try:
                final = self._server.server_final(payload)
            except ScramLoginError:
                return self._failed("Authentication failed.")
            if self._server.username != self._username:
                return self._failed("Authentication failed.")
            self._step = _Step.DONE if self._skip_empty else _Step.EMPTY_SENT
            return {"conversationId": 1, "done": self._skip_empty, "payload": final, "ok": 1.0}
        if self._step is _Step.EMPTY_SENT and payload == b"":
            self._step = _Step.DONE
            return {"conversationId": 1, "done": True, "payload": b"", "ok": 1.0}
        return self._failed("Authentication failed.")
