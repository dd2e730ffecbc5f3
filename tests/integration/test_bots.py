"""Bots and join tokens end to end: the real cluster, `wicket-cluster bots`
and `tokens`, `wicket join` and `wicket renew` as a bot, and a relayed
session with a bot certificate."""

from __future__ import annotations

import itertools
import json
import socket

from tests.integration.harness import Gateway, wait_for

_names = itertools.count(1)


def _bot(cluster, roles: str = "dev") -> str:
    name = f"bot{next(_names)}"
    cluster.admin("bots", "add", name, "--roles", roles)
    return name


def _token(cluster, bot: str, *extra: str) -> dict:
    return json.loads(cluster.admin("tokens", "add", "--bot", bot, "--format", "json", *extra).stdout)


def _join(cluster, tmp_path, token: str, home: str = "bot") -> tuple[Gateway, object]:
    gw = Gateway(tmp_path, cluster, home)
    token_file = tmp_path / f"{home}.token"
    token_file.write_text(token + "\n")
    r = gw.run("join", cluster.address, "--ca-pin", cluster.pin, "--token-file", str(token_file), "--format", "json")
    return gw, r


def _echo_through(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"ping")
        return s.recv(4)


def test_a_bot_joins_once_with_a_one_time_token_and_reaches_its_resources(cluster, tmp_path):
    bot = _bot(cluster)
    token = _token(cluster, bot)
    assert token["token"].startswith("wjt_") and token["uses"] == 1
    # Stored hashed: the token itself is nowhere in the store.
    assert token["token"].encode() not in (cluster.state / "wicket.db").read_bytes()

    gw, r = _join(cluster, tmp_path, token["token"])
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["user"] == bot and status["kind"] == "bot" and status["roles"] == ["dev"]
    assert 3000 < status["remaining_seconds"] <= 3600  # the default hour

    proc, port = gw.proxy_tcp("echo")
    assert _echo_through(port) == b"ping"
    proc.stop()

    again, r = _join(cluster, tmp_path, token["token"], home="bot-again")
    assert r.returncode == 4
    assert f"join token {token['id']} has been used up" in r.stderr
    joined = cluster.wait_audit(event="bot.join", user=bot)
    assert joined[0]["token"] == token["id"] and joined[0]["uses_left"] == 0
    failed = cluster.wait_audit(event="bot.join_failed", user=bot)
    assert failed[0]["reason"] == "used_up" and failed[0]["token"] == token["id"]
    assert token["token"] not in (cluster.state / "audit.jsonl").read_text()


def test_an_expired_or_unknown_token_is_refused_clearly(cluster, tmp_path):
    bot = _bot(cluster)
    token = _token(cluster, bot, "--ttl", "1s")
    wait_for(lambda: json.loads(cluster.admin("tokens", "ls", "--bot", bot, "--format", "json").stdout)[0]["state"]
             == "expired", what="the token to expire", interval=0.2)
    _, r = _join(cluster, tmp_path, token["token"])
    assert r.returncode == 4 and f"join token {token['id']} has expired" in r.stderr
    _, r = _join(cluster, tmp_path, "wjt_" + "x" * 43, home="unknown")
    assert r.returncode == 4 and "not known to this cluster" in r.stderr


def test_a_bot_renews_itself_and_a_locked_or_removed_bot_cannot(cluster, tmp_path):
    bot = _bot(cluster)
    gw, r = _join(cluster, tmp_path, _token(cluster, bot)["token"])
    assert r.returncode == 0, r.stderr
    before = json.loads(gw.run("status", "--format", "json").stdout)
    r = gw.run("renew", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "bot"
    renewed = cluster.wait_audit(event="bot.renew", user=bot)
    assert renewed[0]["renewal"] == 1
    assert json.loads(r.stdout)["expires_at"] >= before["expires_at"]

    cluster.admin("bots", "lock", bot, "--reason", "rotated")
    r = gw.run("renew")
    assert r.returncode == 4 and "is locked (rotated)" in r.stderr
    cluster.admin("bots", "unlock", bot)
    r = gw.run("renew")  # the lock revoked the certificates it had
    assert r.returncode == 3 and "revoked" in r.stderr

    gw2, r = _join(cluster, tmp_path, _token(cluster, bot)["token"], home="bot2")
    assert r.returncode == 0, r.stderr
    cluster.admin("bots", "rm", bot)
    r = gw2.run("renew")
    assert r.returncode == 4 and f"bot {bot} no longer exists" in r.stderr


def test_a_copied_bot_certificate_renewed_twice_locks_the_bot(cluster, tmp_path):
    import shutil

    bot = _bot(cluster)
    gw, r = _join(cluster, tmp_path, _token(cluster, bot)["token"])
    assert r.returncode == 0, r.stderr
    copy = Gateway(tmp_path, cluster, "copy")
    shutil.copytree(gw.home, copy.home)
    assert gw.run("renew").returncode == 0
    r = copy.run("renew")
    assert r.returncode == 4 and "renewed a certificate out of turn" in r.stderr
    rows = json.loads(cluster.admin("bots", "ls", "--format", "json").stdout)
    assert [b["locked"] for b in rows if b["name"] == bot][0].startswith("instance")
    assert gw.run("renew").returncode == 4  # every copy stops


def test_bots_and_users_share_names_and_tokens_list_without_secrets(cluster):
    bot = _bot(cluster)
    r = cluster.admin("users", "add", bot, "--password-stdin", input="correct horse battery staple\n",
                      check=False)
    assert r.returncode == 1 and "taken by a bot" in r.stderr
    cluster.add_user(f"person{bot}", "dev")
    r = cluster.admin("bots", "add", f"person{bot}", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    token = _token(cluster, bot, "--uses", "3", "--ttl", "1h")
    listed = cluster.admin("tokens", "ls", "--bot", bot, "--format", "json").stdout
    assert token["token"] not in listed
    assert json.loads(listed)[0] | {"expires": 0} == {
        "id": token["id"], "bot": bot, "uses_left": 3, "used": 0, "expires": 0, "state": "usable",
        "created_by": json.loads(listed)[0]["created_by"]}
    cluster.admin("tokens", "rm", token["id"])
    assert json.loads(cluster.admin("tokens", "ls", "--bot", bot, "--format", "json").stdout) == []
