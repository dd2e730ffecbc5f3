"""The plaintext start of SSH, read for the server's host key: whole, one
byte at a time, with trailing data, and fuzzed."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from protocols.ssh.transport import (
    MAX_LINE, MSG_KEX_DH_GEX_REPLY, MSG_KEX_REPLY, MSG_KEXINIT, MSG_NEWKEYS, KexWatcher, reply_message,
)


def string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def packet(payload: bytes, padding: int = 4) -> bytes:
    # RFC 4253 §6: the whole packet a multiple of 8 is not checked by us.
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + os.urandom(padding)


def kexinit(*kex: str) -> bytes:
    lists = [",".join(kex).encode(), b"ssh-ed25519", b"aes128-ctr", b"aes128-ctr", b"hmac-sha2-256",
             b"hmac-sha2-256", b"none", b"none", b"", b""]
    return packet(bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(string(x) for x in lists) + b"\x00" + b"\0" * 4)


HOST_KEY = string(b"ssh-ed25519") + string(os.urandom(32))
CLIENT = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + kexinit("curve25519-sha256", "ext-info-c") \
    + packet(bytes([30]) + string(os.urandom(32)))
SERVER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" + kexinit("sntrup761x25519-sha512@openssh.com", "curve25519-sha256") \
    + packet(bytes([MSG_KEX_REPLY]) + string(HOST_KEY) + string(os.urandom(32)) + string(os.urandom(83))) \
    + packet(bytes([MSG_NEWKEYS]))


def feed(watcher: KexWatcher, client: bytes, server: bytes, step: int | None):
    """Client first (it sends its KEXINIT before the server's reply), in
    chunks of ``step`` bytes (None: whole)."""
    for i in range(0, len(client), step or len(client)):
        watcher.client_data(client[i:i + (step or len(client))])
    seen = []
    for i in range(0, len(server), step or len(server)):
        got = watcher.server_data(server[i:i + (step or len(server))])
        if got is not None:
            seen.append(got)
    return seen


@pytest.mark.parametrize("step", [None, 1, 7])
def test_the_host_key_is_found_once(step):
    w = KexWatcher()
    seen = feed(w, CLIENT, SERVER + b"encrypted garbage" * 100, step)
    assert len(seen) == 1 and w.done
    assert seen[0].blob == HOST_KEY and seen[0].kex == "curve25519-sha256"
    assert seen[0].server_version.startswith("SSH-2.0-OpenSSH_9.2")


def test_lines_before_the_servers_version_are_allowed():
    w = KexWatcher()
    assert feed(w, CLIENT, b"Hello there\r\nsecond line\n" + SERVER, 3)[0].blob == HOST_KEY


def test_group_exchange_reads_the_reply_not_the_group():
    gex = "diffie-hellman-group-exchange-sha256"
    client = b"SSH-2.0-x\r\n" + kexinit(gex)
    server = b"SSH-2.0-y\r\n" + kexinit(gex) + packet(bytes([MSG_KEX_REPLY]) + string(b"\x00\xff" * 64) + string(b"\x02")) \
        + packet(bytes([MSG_KEX_DH_GEX_REPLY]) + string(HOST_KEY) + string(b"f") + string(b"sig"))
    seen = feed(KexWatcher(), client, server, 5)
    assert seen[0].blob == HOST_KEY and seen[0].kex == gex


def test_ignore_and_debug_messages_are_skipped():
    server = SERVER.replace(b"\r\n", b"\r\n" + packet(bytes([2]) + string(b"ignored")), 1)
    assert feed(KexWatcher(), CLIENT, server, None)[0].blob == HOST_KEY


@pytest.mark.parametrize("client, server, message", [
    (CLIENT, b"SSH-1.5-old\r\n", "not SSH 2.0"),
    (CLIENT, b"x" * (MAX_LINE + 1), "longer than 255"),
    (CLIENT, b"line\n" * 40, "no SSH version line"),
    (b"SSH-2.0-x\r\n" + kexinit("gss-gex-sha1-x"),
     b"SSH-2.0-y\r\n" + kexinit("gss-gex-sha1-x") + packet(bytes([MSG_KEX_REPLY]) + string(HOST_KEY)),
     "not one whose host key Wicket can check"),
    (b"SSH-2.0-x\r\n" + kexinit("none-such"), SERVER, "share no key exchange method"),
    (b"SSH-2.0-x\r\n", SERVER, "before both sides' KEXINIT"),
    (CLIENT, b"SSH-2.0-y\r\n" + packet(bytes([MSG_NEWKEYS])), "ended the key exchange"),
    (CLIENT, b"SSH-2.0-y\r\n" + struct.pack(">IB", 1 << 20, 4), "exceeds the maximum"),
    (CLIENT, b"SSH-2.0-y\r\n" + struct.pack(">IB", 6, 5) + b"\x14" + b"\0" * 5, "padding"),
    (CLIENT, b"SSH-2.0-y\r\n" + kexinit("curve25519-sha256") + packet(bytes([MSG_KEX_REPLY]) + b"\0\0\1\0"),
     "runs past its packet"),
])
def test_bad_input_is_a_remote_error(client, server, message):
    with pytest.raises(RemoteProtocolError, match=message):
        feed(KexWatcher(), client, server, None)


def test_reply_messages():
    assert reply_message("curve25519-sha256@libssh.org") == MSG_KEX_REPLY
    assert reply_message("ecdh-sha2-nistp256") == MSG_KEX_REPLY
    assert reply_message("mlkem768x25519-sha256") == MSG_KEX_REPLY
    assert reply_message("diffie-hellman-group-exchange-sha1") == MSG_KEX_DH_GEX_REPLY


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.integers(1, 64))
def test_random_bytes_never_crash_and_never_grow(data, step):
    w = KexWatcher()
    try:
        feed(w, CLIENT, b"SSH-2.0-fuzz\r\n" + data, step)
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(SERVER) - 1), st.binary(min_size=1, max_size=8))
def test_corrupted_streams_fail_cleanly_or_still_find_a_key(at, junk):
    w = KexWatcher()
    try:
        seen = feed(w, CLIENT, SERVER[:at] + junk + SERVER[at:], 11)
    except RemoteProtocolError:
        return
    assert all(isinstance(s.blob, bytes) for s in seen)
