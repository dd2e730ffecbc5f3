"""protocols.mongodb.scram: SCRAM-SHA-1 and SCRAM-SHA-256 logins as
saslStart/saslContinue bodies, against a small SCRAM server written here."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from protocols.errors import LocalProtocolError
from protocols.mongodb import bson, wire
from protocols.mongodb.scram import ScramLogin, ScramLoginError, password_digest

SALT = b"0123456789abcdef"


class Server:
    """The server half of SCRAM, as a MongoDB server runs it for ``secret``
    (the stored password input: the digest for SHA-1, SASLprep'd for SHA-256)."""

    def __init__(self, mechanism: str, secret: bytes, *, empty_exchange: bool = False) -> None:
        self.digest = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}[mechanism]
        self.salted = hashlib.pbkdf2_hmac(self.digest, secret, SALT, 4096)
        self.empty_exchange = empty_exchange

    def hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, self.digest).digest()

    def first(self, start: dict[str, Any]) -> dict[str, Any]:
        self.client_first_bare = start["payload"][3:]
        nonce = dict(p.split("=", 1) for p in self.client_first_bare.decode().split(","))["r"]
        self.server_first = (f"r={nonce}SERVER,s={base64.b64encode(SALT).decode()},"
                             f"i=4096").encode()
        return {"conversationId": 1, "done": False, "payload": self.server_first, "ok": 1.0}

    def final(self, cont: dict[str, Any]) -> dict[str, Any]:
        without_proof, _, proof = cont["payload"].rpartition(b",p=")
        auth = self.client_first_bare + b"," + self.server_first + b"," + without_proof
        client_key = self.hmac(self.salted, b"Client Key")
        stored = hashlib.new(self.digest, client_key).digest()
        expected = bytes(a ^ b for a, b in zip(client_key, self.hmac(stored, auth)))
        if base64.b64decode(proof) != expected:
            return {"ok": 0.0, "errmsg": "Authentication failed.", "code": 18,
                    "codeName": "AuthenticationFailed"}
        signature = self.hmac(self.hmac(self.salted, b"Server Key"), auth)
        return {"conversationId": 1, "done": not self.empty_exchange,
                "payload": b"v=" + base64.b64encode(signature), "ok": 1.0}


def run(login: ScramLogin, server: Server) -> list[dict[str, Any]]:
    """The whole conversation; every body goes through the wire and back."""
    sent = []
    body = login.start()
    sent.append(body)
    reply = server.first(body)
    body = login.step(bson.decode(bson.encode(reply)))
    while body is not None:
        sent.append(body)
        raw = wire.OpMsg(body=body).encode()  # what the cluster would send
        assert wire.decode_message(raw).body == body
        reply = (server.final(body) if body["payload"]
                 else {"conversationId": 1, "done": True, "payload": b"", "ok": 1})
        body = login.step(bson.decode(bson.encode(reply)))
    return sent


@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_a_login(mechanism: str, empty: bool) -> None:
    login = ScramLogin(username="app", password="s3cret\u00a0pw", mechanism=mechanism,
                       source="admin")
    secret = (password_digest("app", "s3cret\u00a0pw") if mechanism == "SCRAM-SHA-1"
              else "s3cret pw").encode()
    sent = run(login, Server(mechanism, secret, empty_exchange=empty))
    assert login.done and len(sent) == (3 if empty else 2)
    assert sent[0]["saslStart"] == 1 and sent[0]["mechanism"] == mechanism
    assert sent[0]["payload"].startswith(b"n,,n=app,r=") and sent[0]["$db"] == "admin"
    assert sent[1]["conversationId"] == 1 and sent[1]["payload"].startswith(b"c=biws,r=")
    assert "s3cret" not in repr(sent) and repr(login) == f"<ScramLogin {mechanism} DONE>"


def test_the_sha1_password_is_mongo_s_digest() -> None:
    assert password_digest("user", "pencil") == hashlib.md5(b"user:mongo:pencil").hexdigest()


def test_a_wrong_password_is_the_server_s_refusal() -> None:
    login = ScramLogin(username="app", password="wrong")
    with pytest.raises(ScramLoginError) as info:
        run(login, Server("SCRAM-SHA-256", b"right"))
    assert info.value.wire_hint == 18 and "Authentication failed." in info.value.message


def test_an_impostor_server_is_refused() -> None:
    login = ScramLogin(username="app", password="pw")
    server = Server("SCRAM-SHA-256", b"pw")
    start = login.start()
    body = login.step(server.first(start))
    assert body is not None
    with pytest.raises(ScramLoginError) as info:
        login.step({"conversationId": 1, "done": True, "payload": b"v=" + b"A" * 44, "ok": 1})
    assert "signature is wrong" in info.value.message


def first_reply(**changes: Any) -> dict[str, Any]:
    reply = {"conversationId": 1, "done": False, "payload": b"r=x", "ok": 1}
    reply.update(changes)
    return {k: v for k, v in reply.items() if v is not None}


@pytest.mark.parametrize("reply, words", [
    ({"ok": 0, "code": bson.Int64(334), "errmsg": "no such mechanism"}, "no such mechanism"),
    (first_reply(done=None), "done"),
    (first_reply(payload="r=x"), "payload"),
    (first_reply(done=True), "before our proof"),
    (first_reply(conversationId="1"), "conversationId"),
    (first_reply(payload=b"r=elsewhere,s=QQ==,i=1"), "nonce"),
])
def test_bad_first_replies(reply: dict[str, Any], words: str) -> None:
    login = ScramLogin(username="app", password="pw", nonce="abc")
    login.start()
    with pytest.raises(ScramLoginError) as info:
        login.step(reply)
    assert words in info.value.message
    with pytest.raises(LocalProtocolError):
        login.step(reply)  # failed for good


def test_a_server_that_goes_on_after_the_end() -> None:
    login = ScramLogin(username="app", password="pw")
    server = Server("SCRAM-SHA-256", b"pw", empty_exchange=True)
    body = login.step(server.first(login.start()))
    assert login.step(server.final(body)) == {"saslContinue": 1, "conversationId": 1,
                                              "payload": b"", "$db": "admin"}
    with pytest.raises(ScramLoginError):
        login.step({"conversationId": 1, "done": False, "payload": b"", "ok": 1})


def test_misuse_is_local() -> None:
    login = ScramLogin(username="app", password="pw")
    with pytest.raises(LocalProtocolError):
        login.step({"ok": 1})
    login.start()
    with pytest.raises(LocalProtocolError):
        login.start()
    with pytest.raises(ValueError):
        ScramLogin(username="a", password="pw", mechanism="PLAIN")
    with pytest.raises(ValueError):
        ScramLogin(username="a", password="\u0007")  # SASLprep prohibits controls


# --- the local credential: the server side -------------------------------------------


def _local(**kwargs):
    from protocols.mongodb.scram import LocalLogin
    return LocalLogin(username="wicket", password="local token", salt=b"0123456789abcdef", **kwargs)


def _converse(server, client) -> dict[str, Any]:
    body = client.start()
    reply: dict[str, Any] = {}
    while body is not None:
        reply = server.answer(body)
        if not reply.get("ok"):
            return reply
        body = client.step(reply)
    return reply


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_the_local_credential_logs_a_client_in(mechanism: str) -> None:
    server = _local()
    client = ScramLogin(username="wicket", password="local token", mechanism=mechanism)
    assert _converse(server, client)["done"] is True
    assert server.done and client.done  # each proved it knows the password


@pytest.mark.parametrize("user, password", [("wicket", "guess"), ("app", "local token")])
def test_any_other_credential_is_one_failure(user: str, password: str) -> None:
    server = _local()
    reply = _converse(server, ScramLogin(username=user, password=password))
    assert (reply["ok"], reply["code"], reply["errmsg"]) == (0.0, 18, "Authentication failed.")
    assert not server.done


def test_the_empty_exchange_when_the_client_wants_it() -> None:
    server = _local()
    client = ScramLogin(username="wicket", password="local token")
    start = client.start()
    start["options"] = {}  # an older driver: no skipEmptyExchange
    final = server.answer({"saslContinue": 1, "conversationId": 1,
                           "payload": client.step(server.answer(start))["payload"]})
    assert final["done"] is False and not server.done
    assert server.answer({"saslContinue": 1, "conversationId": 1, "payload": b""})["done"] is True
    assert server.done


@pytest.mark.parametrize("body", [
    {"saslStart": 1, "mechanism": "PLAIN", "payload": b"\x00wicket\x00local token"},
    {"saslContinue": 1, "conversationId": 1, "payload": b"c=biws"},  # no saslStart first
    {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"p=tls-unique,,n=wicket,r=abc"},
    {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"\xff\xfe"},
])
def test_bad_starts_are_refused(body: dict[str, Any]) -> None:
    reply = _local().answer(body)
    assert reply["ok"] == 0.0 and reply["code"] in (18, 334)
