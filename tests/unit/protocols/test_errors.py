"""protocols.errors: the two error families and their codes."""

from __future__ import annotations

import pickle

import pytest

from protocols.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError


def test_the_base_class_cannot_be_raised_directly() -> None:
    with pytest.raises(TypeError, match="LocalProtocolError or RemoteProtocolError"):
        ProtocolError("which side?")


def test_error_defaults_and_attributes() -> None:
    local = LocalProtocolError("sent out of turn")
    remote = RemoteProtocolError("garbage")
    assert local.code is ErrorCode.INTERNAL_ERROR and remote.code is ErrorCode.BAD_REQUEST
    assert local.wire_hint is None and remote.wire_hint is None
    assert str(remote) == remote.message == "garbage"
    assert isinstance(local, ProtocolError) and isinstance(remote, ProtocolError)
    assert repr(remote) == "RemoteProtocolError('garbage', code=ErrorCode.BAD_REQUEST)"
    hinted = RemoteProtocolError("no such db", code=ErrorCode.RESOURCE_NOT_FOUND, wire_hint="3D000")
    assert hinted.wire_hint == "3D000"
    assert repr(hinted) == (
        "RemoteProtocolError('no such db', code=ErrorCode.RESOURCE_NOT_FOUND, wire_hint='3D000')"
    )


def test_error_code_must_be_an_error_code() -> None:
    with pytest.raises(TypeError, match="ErrorCode"):
        RemoteProtocolError("x", code="bad_request")  # type: ignore[arg-type]


def test_errors_pickle_whole() -> None:
    original = LocalProtocolError("boom", code=ErrorCode.RATE_LIMITED, wire_hint=1040)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is LocalProtocolError
    assert (copy.message, copy.code, copy.wire_hint) == ("boom", ErrorCode.RATE_LIMITED, 1040)


def test_error_code_values_are_the_wire_strings() -> None:
    assert {code.value for code in ErrorCode} == {
        "access_denied", "resource_not_found", "cert_expired", "cert_invalid",
        "cert_required", "user_locked", "upstream_unreachable", "bad_request",
        "unsupported_version", "rate_limited", "internal_error",
    }
