"""protocols.postgres.messages.fields: the validators every message class runs."""

from __future__ import annotations


import pytest

from protocols.errors import LocalProtocolError
from protocols.postgres import messages as m

def test_secrets_stay_out_of_reprs() -> None:
    assert "hunter2" not in repr(m.PasswordMessage(password=b"hunter2"))
    assert "topsecret" not in repr(m.SASLResponse(data=b"topsecret"))
    assert "kkkk" not in repr(m.CancelRequest(process_id=1, secret_key=b"kkkk"))
    assert "kkkk" not in repr(m.BackendKeyData(process_id=1, secret_key=b"kkkk"))
    assert "<3 bytes>" in repr(m.CopyData(data=b"abc"))


@pytest.mark.parametrize("build", [
    lambda: m.Query(text="a\x00"),
    lambda: m.Query(text=1),
    lambda: m.Query(text="\ud800"),
    lambda: m.PasswordMessage(password="str"),
    lambda: m.PasswordMessage(password=b"a\x00b"),
    lambda: m.ReadyForQuery(status="X"),
    lambda: m.BackendKeyData(process_id=-1, secret_key=b"kkkk"),
    lambda: m.BackendKeyData(process_id=True, secret_key=b"kkkk"),
    lambda: m.BackendKeyData(process_id=1, secret_key=b"k"),
    lambda: m.CancelRequest(process_id=1, secret_key=b"k" * 257),
    lambda: m.AuthenticationMD5Password(salt=b"abc"),
    lambda: m.AuthenticationSASL(mechanisms="SCRAM"),
    lambda: m.AuthenticationSASL(mechanisms=("",)),
    lambda: m.AuthenticationSASL(mechanisms=("\udcff",)),
    lambda: m.StartupMessage(parameters={"database": "d"}),
    lambda: m.StartupMessage(parameters={"user": ""}),
    lambda: m.StartupMessage(parameters=[("user", "u")]),
    lambda: m.StartupMessage(parameters={"user": "u", "": "x"}),
    lambda: m.StartupMessage(parameters={"user": "u", "k": None}),
    lambda: m.StartupMessage(parameters={"user": "u", "k": "\ud800"}),
    lambda: m.StartupMessage(parameters={"user": "u"}, major=70000),
    lambda: m.Describe(kind="X"),
    lambda: m.Bind(portal="", statement="", param_formats=(2,)),
    lambda: m.Bind(portal="", statement="", param_formats=[True]),
    lambda: m.Bind(portal="", statement="", param_formats="01"),
    lambda: m.Bind(portal="", statement="", param_formats=(0,) * 65536),
    lambda: m.Bind(portal="", statement="", values=("text",)),
    lambda: m.Bind(portal="", statement="", values=b"abc"),
    lambda: m.Parse(statement="", text="", param_types=(-1,)),
    lambda: m.CopyData(data="x"),
    lambda: m.NegotiateProtocolVersion(unrecognized=("a\x00",)),
])
def test_invalid_messages_cannot_be_built(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        build()
