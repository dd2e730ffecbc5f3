"""Logging in for the tcp route, end to end: wrong passwords and their rate
limits per address, TOTP, password hashes upgraded at login."""

from __future__ import annotations

import time

import trio

from tests.integration.harness import PASSWORD
from tests.integration.tcpenv import _login_from


def test_bad_password_and_rate_limit(make_gateway, cluster):
    gw = make_gateway("dev", login=False)
    for _ in range(5):
        r = gw.login(password="wrong password!!")
        assert r.returncode == 4 and "invalid user name, password or TOTP code" in r.stderr
    r = gw.login()  # the right password, but too many failures: refused
    assert r.returncode == 4 and "too many failed logins" in r.stderr
    reasons = [e["reason"] for e in cluster.audit(user=gw.user, event="login.failed")]
    assert reasons == ["wrong password"] * 5  # refusals do not extend the lockout
    assert cluster.audit(user=gw.user, event="login.rate_limited")
    # An unknown user gets the same answer as a wrong password.
    r = gw.run("login", cluster.address, "--user", "nobody-here", "--ca-pin", cluster.pin,
               "--password-stdin", input="whatever it is\n")
    assert r.returncode == 4 and "invalid user name, password or TOTP code" in r.stderr


def test_failures_from_one_address_do_not_keep_the_user_out_of_another(cluster):
    import base64
    from urllib.parse import parse_qs, urlparse

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    r = cluster.add_user("roamer", "dev", "--totp")
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    b32 = parse_qs(urlparse(uri).query)["secret"][0]
    secret = base64.b32decode(b32 + "=" * (-len(b32) % 8), casefold=True)
    # Someone at 127.0.0.3 guesses the password, past the limit.
    for _ in range(5):
        assert _login_from(cluster, "127.0.0.3", "roamer", "a wrong guess!!")[0] == 401
    status, answer = _login_from(cluster, "127.0.0.3", "roamer", "another guess!!")
    assert status == 429 and 0 < answer["error"]["retry_after"] <= 10, answer
    # The user, with the password and a TOTP code, from another address: in at once.
    code = TOTP(secret, 6, SHA1(), 30).generate(time.time()).decode()
    status, answer = _login_from(cluster, "127.0.0.4", "roamer", PASSWORD, code)
    assert status == 200 and answer["user"] == "roamer", answer
    # The pattern is on record: who, from where, how many failures.
    limited = cluster.audit(user="roamer", event="login.rate_limited")[-1]
    assert limited["client_host"] == "127.0.0.3" and limited["failures_for_user_from_address"] == 5


async def test_parallel_guesses_are_rate_limited(cluster, tmp_path):
    """A burst of concurrent wrong passwords cannot all be tried before the
    first failure is recorded."""
    from tests.integration.harness import Gateway

    cluster.add_user("burst", "dev")
    gw = Gateway(tmp_path, cluster, "burst")
    results: list[int] = []

    async def guess() -> None:
        r = await trio.to_thread.run_sync(lambda: gw.login(password="not the password!!"))
        results.append(r.returncode)

    async with trio.open_nursery() as n:
        for _ in range(12):
            n.start_soon(guess)
    assert len(results) == 12 and set(results) == {4}
    failures = cluster.audit(user="burst", event="login.failed")
    assert len(failures) <= 5  # the limit, not twelve tries


def test_totp_login(tmp_path, cluster):
    import base64
    from urllib.parse import parse_qs, urlparse

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    from tests.integration.harness import Gateway

    r = cluster.add_user("tina", "dev", "--totp")
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    assert "issuer=test" in uri
    b32 = parse_qs(urlparse(uri).query)["secret"][0]
    secret = base64.b32decode(b32 + "=" * (-len(b32) % 8), casefold=True)
    gw = Gateway(tmp_path, cluster, "tina")
    r = gw.login()
    assert r.returncode == 4 and "--totp-code" in r.stderr
    code = TOTP(secret, 6, SHA1(), 30).generate(time.time()).decode()
    r = gw.run("login", cluster.address, "--user", "tina", "--ca-pin", cluster.pin, "--password-stdin",
               "--totp-stdin", input=f"{PASSWORD}\n{code}\n")
    assert r.returncode == 0, r.stderr
    r = gw.login("--totp-code", code)  # a code works once
    assert r.returncode == 4
    assert cluster.audit(user="tina", event="user.add")[-1]["totp"] is True


def test_login_upgrades_a_hash_made_with_older_parameters(make_gateway, cluster, monkeypatch):
    from gateway.cluster import passwords
    from gateway.cluster.store import Store

    gw = make_gateway("dev", login=False)
    monkeypatch.setattr(passwords, "TIME_COST", passwords.TIME_COST - 1)  # older, weaker parameters
    old = passwords.hash_password(PASSWORD)
    monkeypatch.undo()
    with Store.open(cluster.state / "wicket.db") as store:
        store.set_password_hash(gw.user, old)
        assert passwords.needs_rehash(store.get_user(gw.user).password_hash)
    assert gw.login().returncode == 0
    with Store.open(cluster.state / "wicket.db") as store:
        new = store.get_user(gw.user).password_hash
    assert new != old and not passwords.needs_rehash(new)
    assert passwords.verify_password(new, PASSWORD)
    assert gw.login().returncode == 0  # and the new one works


def test_login_upgrades_an_old_hash_only_once_totp_passed(tmp_path, cluster, monkeypatch):
    import base64
    from urllib.parse import parse_qs, urlparse

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    from gateway.cluster import passwords
    from gateway.cluster.store import Store
    from tests.integration.harness import Gateway

    r = cluster.add_user("tom", "dev", "--totp")
    b32 = parse_qs(urlparse(next(line for line in r.stdout.splitlines()
                                 if line.startswith("otpauth://totp/"))).query)["secret"][0]
    totp = TOTP(base64.b32decode(b32 + "=" * (-len(b32) % 8), casefold=True), 6, SHA1(), 30)
    monkeypatch.setattr(passwords, "MEMORY_KIB", passwords.MEMORY_KIB // 2)  # older, weaker parameters
    old = passwords.hash_password(PASSWORD)
    monkeypatch.undo()
    with Store.open(cluster.state / "wicket.db") as store:
        store.set_password_hash("tom", old)

    def stored() -> str:
        with Store.open(cluster.state / "wicket.db") as store:
            return store.get_user("tom").password_hash

    gw = Gateway(tmp_path, cluster, "tom")
    now = time.time()
    code, wrong = totp.generate(now).decode(), "000000"
    if wrong == code:
        wrong = "111111"
    assert gw.login().returncode == 4  # the right password, no code: not upgraded
    assert gw.login("--totp-code", wrong).returncode == 4
    assert stored() == old
    assert gw.login("--totp-code", code).returncode == 0
    new = stored()
    assert new != old and not passwords.needs_rehash(new) and passwords.verify_password(new, PASSWORD)
    # And the new hash logs in (the next step's code: this one is spent).
    assert gw.login("--totp-code", totp.generate(now + 30).decode()).returncode == 0
    assert stored() == new
