"""protocols.mysql.generic: OK, ERR and EOF, against dev.mysql.com's examples."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError
from protocols.mysql.constants import Capability, ServerStatus
from protocols.mysql.generic import EofPacket, ErrPacket, OkPacket, is_eof
from tests.unit.protocols.feeding import fuzz, malformed
from tests.unit.protocols.mysql.samples import fuzz_decoders, names, payload

# dev.mysql.com, ERR_Packet, OK_Packet and EOF_Packet examples.
ERR_EXAMPLE = payload("17000001ff48042348593030304e6f207461626c65732075736564")
OK_EXAMPLE = payload("0700000200000002000000")
EOF_EXAMPLE = payload("050000 05fe00000200".replace(" ", ""))


def test_ok_example_and_session_tracking() -> None:
    ok = OkPacket.decode(OK_EXAMPLE, Capability.PROTOCOL_41)
    assert ok == OkPacket(status=ServerStatus.AUTOCOMMIT)
    assert ok.encode(Capability.PROTOCOL_41) == OK_EXAMPLE
    tracked = Capability.PROTOCOL_41 | Capability.SESSION_TRACK
    assert OkPacket.decode(OK_EXAMPLE, tracked) == ok  # no info at all: empty
    changed = OkPacket(affected_rows=300, last_insert_id=1 << 40, warnings=2, info=b"Rows: 1",
                       status=ServerStatus.SESSION_STATE_CHANGED, session_state=b"\x01\x05\x04shop",
                       header=0xFE)
    assert OkPacket.decode(changed.encode(tracked), tracked) == changed
    info_only = OkPacket(info=b"hello")
    assert OkPacket.decode(info_only.encode(tracked), tracked) == info_only
    assert OkPacket.decode(info_only.encode(Capability(0)), Capability(0)) == info_only
    # Without SESSION_TRACK the flag cannot be honoured: it is dropped.
    assert OkPacket.decode(changed.encode(tracked), Capability(0)).session_state is None
    assert "trailing" in malformed(OkPacket.decode, OK_EXAMPLE + b"\x00x", tracked).message
    assert "not an OK" in malformed(OkPacket.decode, b"\x01", tracked).message
    for bad in ({"header": 1}, {"session_state": b""}, {"affected_rows": -1}):
        with pytest.raises(LocalProtocolError):
            OkPacket(**bad)  # type: ignore[arg-type]


def test_err_example_and_the_optional_sqlstate() -> None:
    err = ErrPacket.decode(ERR_EXAMPLE)
    assert err == ErrPacket(errno=1096, sqlstate="HY000", message="No tables used")
    assert err.encode() == ERR_EXAMPLE
    early = ErrPacket.decode(b"\xff\x10\x04Too many connections")
    assert early.errno == 1040 and early.sqlstate is None
    assert early.encode() == b"\xff\x10\x04Too many connections"
    assert ErrPacket.of(1045, "no").sqlstate == "28000"
    assert ErrPacket.of(1234, "no").sqlstate == "HY000"
    assert "progress" in malformed(ErrPacket.decode, b"\xff\xff\xff\x01\x02").message
    assert "not ASCII" in malformed(ErrPacket.decode, b"\xff\x01\x00#\xe9\xe9\xe9\xe9\xe9").message
    assert "not an ERR" in malformed(ErrPacket.decode, b"\x00").message
    for bad in ({"sqlstate": "123"}, {"errno": 0xFFFF}, {"errno": 1 << 16}):
        with pytest.raises(LocalProtocolError):
            ErrPacket(**{"errno": 1, **bad})  # type: ignore[arg-type]


def test_eof_example() -> None:
    eof = EofPacket.decode(EOF_EXAMPLE)
    assert eof == EofPacket(warnings=0, status=ServerStatus.AUTOCOMMIT)
    assert eof.encode() == EOF_EXAMPLE and is_eof(EOF_EXAMPLE)
    assert not is_eof(b"\xfe" + b"\x00" * 8)  # a lenenc integer or a row
    assert "not an EOF" in malformed(EofPacket.decode, b"\xfe" + b"\x00" * 8).message
    assert "trailing" in malformed(EofPacket.decode, EOF_EXAMPLE + b"\x00").message


@fuzz
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF),
       st.integers(0, 0xFFFF), st.binary(max_size=30), st.one_of(st.none(), st.binary(max_size=30)),
       st.sampled_from([0x00, 0xFE]), st.booleans())
def test_ok_round_trips(affected: int, insert_id: int, status: int, warnings: int, info: bytes,
                        state: bytes | None, header: int, tracked: bool) -> None:
    caps = Capability.PROTOCOL_41 | (Capability.SESSION_TRACK if tracked else Capability(0))
    if state is None or not tracked:
        status &= ~ServerStatus.SESSION_STATE_CHANGED
        state = None
    else:
        status |= ServerStatus.SESSION_STATE_CHANGED
    ok = OkPacket(affected_rows=affected, last_insert_id=insert_id, status=status,
                  warnings=warnings, info=info, session_state=state, header=header)
    assert OkPacket.decode(ok.encode(caps), caps) == ok


@fuzz
@given(st.integers(0, 0xFFFE), st.one_of(st.none(), st.text("0123456789ABCDEFHYS", min_size=5,
                                                             max_size=5)), names)
def test_err_round_trips(errno: int, sqlstate: str | None, message: str) -> None:
    if sqlstate is None and message.startswith("#"):
        message = " " + message  # a '#' there reads as the marker, as servers intend
    err = ErrPacket(errno=errno, sqlstate=sqlstate, message=message)
    assert ErrPacket.decode(err.encode()) == err


DECODERS: list[Callable[[bytes], object]] = [
    ErrPacket.decode, EofPacket.decode,
    lambda data: OkPacket.decode(data, Capability.SESSION_TRACK),
    lambda data: OkPacket.decode(data, Capability(0)),
]


test_random_bytes_raise_only_protocol_errors = fuzz_decoders(DECODERS, max_size=60)


@fuzz
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_eof_round_trips(warnings: int, status: int) -> None:
    eof = EofPacket(warnings=warnings, status=status)
    assert EofPacket.decode(eof.encode()) == eof
