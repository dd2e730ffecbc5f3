"""protocols.postgres.audit: audit events from relayed frontend and backend streams."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.auditor import StatementReader
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.postgres import messages as m
from protocols.postgres.audit import (
    BackendAuditor, BindEvent, CommandCompleteEvent, CopyDataEvent, CopyDirection,
    CopyDoneEvent, CopyFailEvent, CopyResponseEvent, ErrorEvent, ExecuteEvent, FrontendAuditor,
    FunctionCallEvent, MessageEvent, ParseEvent, QueryEvent, ReadyForQueryEvent, TerminateEvent,
)
from protocols.postgres.messages import ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, pump, split

IN, OUT = CopyDirection.IN, CopyDirection.OUT


def digest(statement: bytes) -> dict[str, object]:
    """The length and SHA-256 every statement event carries: of all of it."""
    return {"length": len(statement), "sha256": hashlib.sha256(statement).hexdigest()}


def query(text: str, size: int, *, truncated: bool = False, whole: bytes | None = None) -> QueryEvent:
    """A QueryEvent for a statement ``whole`` (``text`` itself unless cut)."""
    return QueryEvent(text=text, truncated=truncated, size=size,
                      **digest(text.encode() if whole is None else whole))


def parse(statement: str, text: str, size: int, param_types: int | None, *, truncated: bool = False,
          whole: bytes | None = None) -> ParseEvent:
    return ParseEvent(statement=statement, text=text, truncated=truncated, size=size, param_types=param_types,
                      **digest(text.encode() if whole is None else whole))






def enc(*messages: object) -> bytes:
    return b"".join(x.encode() for x in messages)  # type: ignore[attr-defined]


# --- frontend -----------------------------------------------------------------------------

SESSION = enc(
    m.Query(text="select 1"),
    m.Parse(statement="s1", text="select $1::int", param_types=(23,)),
    m.Bind(portal="p1", statement="s1", param_formats=(0,), values=(b"42",)),
    m.Describe(kind="P", name="p1"),
    m.Execute(portal="p1", max_rows=0),
    m.Sync(),
    m.Query(text="copy t from stdin"),
    m.CopyData(data=b"1\n"), m.CopyData(data=b"22\n"), m.CopyData(data=b""),
    m.CopyDone(),
    m.Query(text="copy t from stdin"),
    m.CopyData(data=b"x"),
    m.CopyFail(message="nope"),
    m.FunctionCall(oid=952, arg_formats=(1,), args=(b"\x00\x00\x00\x01",), result_format=1),
    m.Close(kind="S", name="s1"),
    m.Flush(),
    m.Terminate(),
)
SESSION_EVENTS = [
    query("select 1", 9),
    parse("s1", "select $1::int", 24, 1),
    BindEvent(portal="p1", statement="s1", param_count=1, param_formats=(0,), values=None,
              truncated=False, size=20),
    ExecuteEvent(portal="p1", max_rows=0),
    query("copy t from stdin", 18),
    CopyDataEvent(direction=IN, messages=3, bytes=5),
    CopyDoneEvent(direction=IN),
    query("copy t from stdin", 18),
    CopyDataEvent(direction=IN, messages=1, bytes=1),
    CopyFailEvent(message="nope", truncated=False),
    FunctionCallEvent(oid=952, arg_count=1, size=20),
    TerminateEvent(),
]


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("eof", (False, True))
def test_frontend_session(how: str, eof: bool) -> None:
    auditor = FrontendAuditor()
    # Bytes after Terminate are not parsed (the server stops reading too).
    events = pump(auditor, split(SESSION + b"\xff garbage", how) + ([b""] if eof else []))
    assert events == SESSION_EVENTS + ([ConnectionClosed(clean=True)] if eof else [])
    assert auditor.messages_seen == 18
    assert auditor.bytes_seen == len(SESSION) + 9


def test_frontend_report_all_and_bind_values() -> None:
    auditor = FrontendAuditor(report_all=True, bind_values=True, max_value=3)
    bind = m.Bind(portal="", statement="s", param_formats=(0, 1, 0),
                  values=(b"12345", None, b"ab"), result_formats=(1,))
    data = enc(bind,
               m.Describe(kind="S", name="s"), m.Sync(), m.Flush(), m.Close(kind="P"))
    data += b"p\x00\x00\x00\x08pw\x00\x00"  # never looked into, only counted
    events = pump(auditor, [data])
    assert events == [
        BindEvent(portal="", statement="s", param_count=3, param_formats=(0, 1, 0),
                  values=(b"123", None, b"ab"), truncated=True, size=len(bind.encode()) - 5),
        MessageEvent(type_code=b"D", size=3), MessageEvent(type_code=b"S", size=0),
        MessageEvent(type_code=b"H", size=0), MessageEvent(type_code=b"C", size=2),
        MessageEvent(type_code=b"p", size=4),
    ]
    assert "12345" not in repr(BindEvent(portal="", statement="", param_count=1,
                                         param_formats=(), values=(b"12345",),
                                         truncated=False, size=0))


def test_frontend_text_is_truncated() -> None:
    auditor = FrontendAuditor(max_text=10)
    events = pump(auditor, [enc(m.Query(text="select 1234567890"),
                                m.Parse(statement="x" * 20, text="abcdefghijk"),
                                m.CopyFail(message="f" * 11))])
    # Statements keep their first and last five bytes around a marker,
    # with the whole statement's length and digest.
    assert events == [
        query("selec\n/* [audit: 7 of 17 bytes not shown; sha256 is of them all] */\n67890", 18,
              truncated=True, whole=b"select 1234567890"),
        parse("x" * 10, "abcde\n/* [audit: 1 of 11 bytes not shown; sha256 is of them all] */\nghijk", 35, 0,
              truncated=True, whole=b"abcdefghijk"),
        CopyFailEvent(message="f" * 10, truncated=True),
    ]


@given(st.binary(max_size=40), st.integers(min_value=1, max_value=24))
def test_a_query_reads_the_same_whatever_its_size(body: bytes, max_text: int) -> None:
    # A whole, short Query takes a quicker way than a long or cut one: both
    # must record it alike (an empty body or a NUL inside it is malformed).
    auditor = FrontendAuditor(max_text=max_text)
    auditor.receive_data(m.frame(b"Q", body))
    try:
        event = auditor.next_event()
    except RemoteProtocolError:
        assert body.find(b"\x00") != len(body) - 1 or not body
        return
    statement = body[:-1]
    assert body.find(b"\x00") == len(body) - 1
    assert event == QueryEvent(text=StatementReader.of(statement, max_text).text,
                               truncated=len(statement) > max_text, size=len(body), **digest(statement))


PADDED = b"/* " + b"x" * 17 * 1024 + b" */ CREATE TABLE hidden (x int)"


@pytest.mark.parametrize("how", FEEDS)
def test_a_padded_statement_keeps_its_tail_length_and_digest(how: str) -> None:
    """Issue 15, item 6: a 17 KiB leading comment hid a CREATE TABLE."""
    events = pump(FrontendAuditor(), split(enc(m.Query(text=PADDED.decode()),
                                                m.Parse(statement="s", text=PADDED.decode())), how))
    for event in events:
        assert isinstance(event, (QueryEvent, ParseEvent)) and event.truncated
        assert event.text.endswith("*/ CREATE TABLE hidden (x int)") and event.text.startswith("/* xxx")
        assert len(event.text.encode()) < 17 * 1024
        assert (event.length, event.sha256) == (len(PADDED), hashlib.sha256(PADDED).hexdigest())
    assert len(events) == 2


@pytest.mark.parametrize("how", FEEDS)
def test_a_statement_in_a_message_over_max_message_is_followed_to_its_end(how: str) -> None:
    """Only a prefix of such a message is kept: the rest of the statement
    streams into the digest and the tail, and the event comes at its end."""
    auditor = FrontendAuditor(max_text=16, max_message=64)
    statement = b"-- " + b"p" * 500 + b"\nDROP TABLE t"
    data = enc(m.Query(text=statement.decode()), m.Parse(statement="n" * 300, text=statement.decode(),
                                                          param_types=(23, 25)), m.Query(text="after"))
    events = pump(auditor, split(data, how))
    tail = "\nDROP TABLE t"[-8:]
    assert [(type(e), e.text[-8:], e.length, e.sha256, e.truncated) for e in events[:2]] == [
        (kind, tail, len(statement), hashlib.sha256(statement).hexdigest(), True) for kind in (QueryEvent, ParseEvent)]
    assert events[2] == query("after", 6)


def test_a_stream_that_ends_inside_a_followed_statement_records_what_came() -> None:
    auditor = FrontendAuditor(max_text=16, max_message=64)
    whole = m.Query(text="s" * 3000 + "END").encode()  # over the kept prefix (max_text + 1 KiB)
    events = pump(auditor, [whole[:2000], b""])
    seen = whole[5:2000]
    assert events == [query("s" * 8 + f"\n/* [audit: {len(seen) - 16} of {len(seen)} bytes not shown; sha256 is of "
                            "them all] */\n" + "s" * 8, len(whole) - 5, truncated=True, whole=seen),
                      ConnectionClosed(clean=False)]


def test_frontend_text_in_any_encoding() -> None:
    # client_encoding may be LATIN1: never fail over text.
    latin1 = m.frame(b"Q", "select 'café'".encode("latin-1") + b"\x00")
    [event] = pump(FrontendAuditor(), [latin1])
    assert isinstance(event, QueryEvent) and event.text == "select 'caf\ufffd'"


def huge(type_code: bytes, head: bytes, total: int, filler: bytes = b"x") -> Iterable[bytes]:
    """A message of ``total`` body bytes, ``head`` first, yielded in 64 KiB chunks
    without ever being built whole."""
    yield type_code + struct.pack(">I", 4 + total) + head
    left = total - len(head)
    block = filler * 65536
    while left > 0:
        step = min(left, 65536)
        yield block[:step]
        left -= step


def test_oversized_query_keeps_its_head_tail_length_and_digest() -> None:
    auditor = FrontendAuditor(max_text=100, max_message=1000)
    text = b"select '" + b"y" * 5000 + b"'\x00"
    events = pump(auditor, [m.frame(b"Q", text), m.Sync().encode()])
    assert events == [query("select '" + "y" * 42 + "\n/* [audit: 4909 of 5009 bytes not shown; sha256 is of "
                            "them all] */\n" + "y" * 49 + "'", len(text), truncated=True, whole=text[:-1])]


def test_oversized_parse_and_bind() -> None:
    auditor = FrontendAuditor(max_text=16, max_message=64, bind_values=True)
    parse_ = m.Parse(statement="s", text="t" * 2000, param_types=(23,)).encode()
    named = m.Parse(statement="n" * 2000, text="x").encode()
    bind = m.Bind(portal="p", statement="s", param_formats=(1,),
                  values=(b"v" * 10, b"w" * 5000)).encode()
    many_types = m.Parse(statement="s", text="t", param_types=(23,) * 1000).encode()
    cut_names = m.Bind(portal="p" * 2000, statement="s").encode()
    cut_statement = m.Bind(portal="", statement="s" * 2000).encode()
    events = pump(auditor, [parse_ + named + many_types + bind + cut_names + cut_statement])
    cut = "\n/* [audit: 1984 of 2000 bytes not shown; sha256 is of them all] */\n"
    assert events == [
        parse("s", "t" * 8 + cut + "t" * 8, len(parse_) - 5, None, truncated=True, whole=b"t" * 2000),
        # The text after a name of over max_message bytes is read all the same.
        parse("n" * 16, "x", len(named) - 5, None),
        parse("s", "t", len(many_types) - 5, 1000),
        BindEvent(portal="p", statement="s", param_count=2, param_formats=(1,),
                  values=(b"v" * 10, b"w" * 256), truncated=True, size=len(bind) - 5),
        BindEvent(portal="p" * 16, statement="", param_count=None, param_formats=(),
                  values=(), truncated=True, size=len(cut_names) - 5),
        BindEvent(portal="", statement="s" * 16, param_count=None, param_formats=(),
                  values=(), truncated=True, size=len(cut_statement) - 5),
    ]


def test_oversized_other_messages() -> None:
    auditor = FrontendAuditor(max_text=4, max_message=8)
    fcall = m.FunctionCall(oid=7, args=(b"a" * 3000,)).encode()
    execute = m.Execute(portal="e" * 3000).encode()
    fail = m.CopyFail(message="f" * 3000).encode()
    describe = m.Describe(kind="S", name="d" * 3000).encode()
    events = pump(auditor, [fcall + execute + fail + describe])
    assert events == [
        FunctionCallEvent(oid=7, arg_count=1, size=len(fcall) - 5),
        ExecuteEvent(portal="eeee", max_rows=0),
        CopyFailEvent(message="ffff", truncated=True),
    ]


def test_50_mib_bind_and_100_mib_copy_in_bounded_memory() -> None:
    auditor = FrontendAuditor()
    size = 50 * 1024 * 1024
    # Bind: portal, statement, one format code (binary), one value of
    # ``size - 24`` bytes, then no result format codes.
    head = b"portal\x00stmt\x00" + b"\x00\x01\x00\x01\x00\x01" + struct.pack(">i", size - 24)
    tracemalloc.start()
    try:
        events: list[object] = []
        # The value's zero bytes run on into the (zero) result format count.
        for chunk in huge(b"B", head, size, filler=b"\x00"):
            events += pump(auditor, [chunk])
        copy = 100 * 1024 * 1024
        for _ in range(100):
            for chunk in huge(b"d", b"", copy // 100):
                events += pump(auditor, [chunk])
        events += pump(auditor, [m.CopyDone().encode(), b""])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # the 1 MiB-bounded prefix plus chunks, not 50 MiB
    assert events == [
        BindEvent(portal="portal", statement="stmt", param_count=1, param_formats=(1,),
                  values=None, truncated=True, size=size),
        CopyDataEvent(direction=IN, messages=100, bytes=copy),
        CopyDoneEvent(direction=IN),
        ConnectionClosed(clean=True),
    ]


VALUES = {"bind_values": True}


@pytest.mark.parametrize("data, words, options", [case if len(case) == 3 else (*case, {}) for case in [
    (b"?\x00\x00\x00\x04", "invalid frontend message type"),
    (b"Q\x00\x00\x00\x03", "length 3 is below the minimum of 4"),
    (b"S\x00\x00\x00\x05x", "invalid length"),
    (b"X\x00\x00\x00\x05x", "invalid length"),
    (m.frame(b"Q", b"select 1"), "without its NUL"),
    (m.frame(b"Q", b"a\x00b"), "trailing"),
    (m.frame(b"P", b"s\x00q\x00\x00"), "truncated"),
    (m.frame(b"B", b"\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00"), "format count"),
    # The values (and what follows them) are only read when they are reported,
    # Describe and Close only when every message is.
    (m.frame(b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"), "negative length",
     VALUES),
    (m.frame(b"B", b"\x00\x00\x00\x01\x00\x07\x00\x00\x00\x00"), "format code"),
    (m.frame(b"B", b"portal"), "without its NUL"),
    (m.frame(b"B", b"\x00\x00\x00"), "truncated"),  # no format count
    (m.frame(b"B", b"\x00\x00\x00\x01\x00\x00"), "truncated"),  # no parameter count
    (m.frame(b"B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x0aab"), "truncated", VALUES),
    (m.frame(b"E", b"\x00\x00\x00"), "truncated"),
    (m.frame(b"D", b"X\x00"), "statement or a portal", {"report_all": True}),
    (m.frame(b"F", b"\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00"), "format count"),
    (m.frame(b"F", b"\x00\x00\x00\x01\x00\x00\x00\x01\xff\xff\xff\xf0\x00\x00"),
     "negative length"),
    (m.frame(b"F", b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x05"), "result format"),
]])
def test_frontend_malformed(data: bytes, words: str, options: dict[str, bool]) -> None:
    auditor = FrontendAuditor(**options)
    # Events before the error come out first.
    assert pump(auditor, [m.Query(text="ok").encode()]) == [
        query("ok", 3)]
    auditor.receive_data(m.Query(text="before").encode() + data + m.Sync().encode())
    assert auditor.next_event() == query("before", 7)
    with pytest.raises(RemoteProtocolError) as info:
        auditor.next_event()
    assert words in info.value.message and info.value.wire_hint == "08P01"
    # Poisoned: more bytes are ignored, the error repeats, EOF adds nothing.
    auditor.receive_data(m.Query(text="after").encode())
    auditor.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        auditor.next_event()


@pytest.mark.parametrize("how", FEEDS)
def test_frontend_eof(how: str) -> None:
    auditor = FrontendAuditor()
    data = enc(m.Query(text="copy"), m.CopyData(data=b"abc"))
    events = pump(auditor, split(data + m.CopyData(data=b"abcdef").encode()[:7], how) + [b""])
    assert events == [query("copy", 5),
                      CopyDataEvent(direction=IN, messages=2, bytes=9),
                      ConnectionClosed(clean=False)]
    assert auditor.next_event() == ConnectionClosed(clean=False)
    auditor.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(LocalProtocolError):
        auditor.receive_data(b"x")


def test_auditor_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrontendAuditor(max_text=0)
    with pytest.raises(ValueError):
        BackendAuditor(max_message=0)


@fuzz
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(SESSION) - 1), max_size=20))
def test_frontend_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(SESSION)]
    chunks = [SESSION[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]
    assert pump(FrontendAuditor(), chunks) == SESSION_EVENTS


#: Each auditor as the fuzz tests make it: with tiny limits, or reporting all.
FUZZED = {
    "frontend": (lambda: FrontendAuditor(max_text=4, max_message=16),
                 lambda: FrontendAuditor(report_all=True, bind_values=True)),
    "backend": (lambda: BackendAuditor(max_text=4, max_message=8), lambda: BackendAuditor(completions=True)),
}


@pytest.mark.parametrize("side", list(FUZZED))
@fuzz
@given(data=st.binary(max_size=200), eof=st.booleans(), small=st.booleans())
def test_random_bytes_give_events_or_a_protocol_error(side: str, data: bytes, eof: bool, small: bool) -> None:
    auditor = FUZZED[side][0 if small else 1]()
    try:
        pump(auditor, [data] + ([b""] if eof else []))
    except RemoteProtocolError:
        pass


@fuzz
@given(messages=st.lists(st.sampled_from([
    m.Query(text="q" * 30), m.Parse(statement="s" * 20, text="t" * 30, param_types=(1, 2)),
    m.Bind(portal="p", statement="s", param_formats=(1,), values=(b"v" * 30, None)),
    m.Execute(portal="e" * 30), m.FunctionCall(oid=1, args=(b"a" * 30,)),
    m.CopyFail(message="f" * 30), m.Describe(kind="S", name="d" * 30),
]), max_size=6), cut=st.integers(min_value=0, max_value=400))
def test_frontend_fuzz_small_limits(messages: list[object], cut: int) -> None:
    # Limits that force the prefix path: whatever the cut, never a crash.
    data = enc(*messages)
    if not data:
        return
    auditor = FrontendAuditor(max_text=3, max_message=8)
    events = pump(auditor, [data[:cut], data[cut:]] if 0 < cut < len(data) else [data])
    assert len(events) == len(messages) - sum(isinstance(x, m.Describe) for x in messages)


# --- backend --------------------------------------------------------------------------------


ERROR = m.ErrorResponse.create(severity="ERROR", sqlstate="42P01",
                               message='relation "nope" does not exist', P="15")
BACKEND_SESSION = enc(
    m.ParameterStatus(name="a", value="b"),  # skipped
    ERROR,
    m.ReadyForQuery(status="I"),
    m.CommandComplete(tag="SELECT 1"),
    m.CopyOutResponse(format=0, column_formats=(0, 0)),
    m.CopyData(data=b"1\t2\n"), m.CopyData(data=b"3\t4\n"),
    m.CopyDone(),
    m.CommandComplete(tag="COPY 2"),
    m.CopyInResponse(format=1, column_formats=(1,)),
    m.CopyBothResponse(),
    m.NoticeResponse.create(severity="NOTICE", sqlstate="00000", message="n"),  # skipped
    m.ReadyForQuery(status="T"),
) + b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x00" + b"~\x00\x00\x00\x04"  # DataRow, unknown
BACKEND_EVENTS = [
    ErrorEvent(severity="ERROR", sqlstate="42P01", message='relation "nope" does not exist',
               truncated=False),
    ReadyForQueryEvent(status="I"),
    CommandCompleteEvent(tag="SELECT 1"),
    CopyResponseEvent(direction=OUT, format=0, columns=2),
    CopyDataEvent(direction=OUT, messages=2, bytes=8),
    CopyDoneEvent(direction=OUT),
    CommandCompleteEvent(tag="COPY 2"),
    CopyResponseEvent(direction=IN, format=1, columns=1),
    CopyResponseEvent(direction=CopyDirection.BOTH, format=0, columns=0),
    ReadyForQueryEvent(status="T"),
]


@pytest.mark.parametrize("how", FEEDS)
def test_backend_session(how: str) -> None:
    auditor = BackendAuditor(completions=True)
    events = pump(auditor, split(BACKEND_SESSION, how) + [b""])
    assert events == BACKEND_EVENTS + [ConnectionClosed(clean=True)]


@pytest.mark.parametrize("how", FEEDS)
def test_backend_skips_completions_by_default(how: str) -> None:
    # What the cluster audits: errors and COPY. CommandComplete and
    # ReadyForQuery are skipped by their length, like DataRow, and so are
    # their flaws (the cost of checking them is a decode per statement).
    auditor = BackendAuditor()
    events = pump(auditor, split(BACKEND_SESSION + b"Z\x00\x00\x00\x05X", how) + [b""])
    completions = (CommandCompleteEvent, ReadyForQueryEvent)
    assert events == [e for e in BACKEND_EVENTS if not isinstance(e, completions)] + [
        ConnectionClosed(clean=True)]
    assert auditor.messages_seen == 16


def test_backend_error_fields() -> None:
    old = m.ErrorResponse(fields={"S": "ERROR", "M": "m"})
    nothing = m.ErrorResponse(fields={})
    events = pump(BackendAuditor(max_text=5), [enc(old, nothing, ERROR)])
    assert events == [
        ErrorEvent(severity="ERROR", sqlstate=None, message="m", truncated=False),
        ErrorEvent(severity=None, sqlstate=None, message="", truncated=False),
        ErrorEvent(severity="ERROR", sqlstate="42P01", message="relat", truncated=True),
    ]


def test_backend_oversized_messages() -> None:
    auditor = BackendAuditor(max_text=8, max_message=16, completions=True)
    early = m.ErrorResponse(fields={"S": "ERROR", "C": "XX000", "M": "x" * 5000})
    late = m.ErrorResponse(fields={"M": "y" * 2000, "S": "FATAL"})
    # A prefix (max_text + 1 KiB) that ends right after a whole field.
    cut_code = m.ErrorResponse(fields={"D": "d" * 1030, "M": "m"})
    tag = m.CommandComplete(tag="T" * 3000)
    copy = m.CopyOutResponse(format=1, column_formats=(1,) * 1000)
    events = pump(auditor, [enc(early, late, cut_code, tag, copy)])
    assert events == [
        ErrorEvent(severity="ERROR", sqlstate="XX000", message="x" * 8, truncated=True),
        ErrorEvent(severity=None, sqlstate=None, message="y" * 8, truncated=True),
        ErrorEvent(severity=None, sqlstate=None, message="", truncated=True),
        CommandCompleteEvent(tag="T" * 8),
        CopyResponseEvent(direction=OUT, format=1, columns=-1),
    ]


@pytest.mark.parametrize("data", [
    b"Z\x00\x00\x00\x04",
    b"Z\x00\x00\x00\x05X",
    b"c\x00\x00\x00\x05x",
    m.frame(b"E", b"SERROR\x00"),
    m.frame(b"E", b"SERROR"),
    m.frame(b"C", b"tag"),
    m.frame(b"C", b"tag\x00x"),
    m.frame(b"H", b"\x02\x00\x00"),
    m.frame(b"H", b"\x00\x00\x01\x00\x03"),
    m.frame(b"G", b"\x00\x00\x00x"),
    b"D\x00\x00\x00\x02",
])
def test_backend_malformed(data: bytes) -> None:
    auditor = BackendAuditor(completions=True)
    auditor.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        auditor.next_event()
    assert info.value.wire_hint == "08P01"


def test_backend_100_mib_copy_out() -> None:
    auditor = BackendAuditor()
    events = pump(auditor, [m.CopyOutResponse().encode()])
    for _ in range(4):
        for chunk in huge(b"d", b"", 25 * 1024 * 1024):
            events += pump(auditor, [chunk])
    events += pump(auditor, [b"D\x00\x00\x00\x06\x00\x00" * 3, m.CopyDone().encode()])
    assert events == [CopyResponseEvent(direction=OUT, format=0, columns=0),
                      CopyDataEvent(direction=OUT, messages=4, bytes=100 * 1024 * 1024),
                      CopyDoneEvent(direction=OUT)]


@fuzz
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(BACKEND_SESSION) - 1),
                     max_size=20))
def test_backend_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(BACKEND_SESSION)]
    chunks = [BACKEND_SESSION[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]
    assert pump(BackendAuditor(completions=True), chunks) == BACKEND_EVENTS


@fuzz
@given(messages=st.lists(st.sampled_from([
    ERROR, m.CommandComplete(tag="INSERT 0 1"), m.CopyOutResponse(column_formats=(0, 0, 0)),
    m.ReadyForQuery(), m.CopyData(data=b"row"), m.CopyDone(),
    m.ErrorResponse(fields={"M": "m" * 40, "S": "ERROR", "C": "XX000"}),
]), max_size=8), cut=st.integers(min_value=0, max_value=500))
def test_backend_fuzz_small_limits(messages: list[object], cut: int) -> None:
    data = enc(*messages)
    auditor = BackendAuditor(max_text=3, max_message=6)
    pump(auditor, [data[:cut], data[cut:]] if 0 < cut < len(data) else [data])
