"""protocols.postgres.options: the options start-up parameter and the
settings allowlist."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.postgres.options import (
    ALLOWED_SETTINGS, Setting, format_options, parse_options, session_parameters, setting_allowed,
    split_options,
)

fuzz = settings(derandomize=True, database=None, deadline=None, max_examples=300)

DENIED, SYNTAX = "42501", "42601"


def refused(fn, *args) -> RemoteProtocolError:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    return info.value


def S(name: str, value: str) -> Setting:
    return Setting(name=name, value=value)


# --- splitting, as pg_split_opts does (src/backend/utils/init/postinit.c) ------------


@pytest.mark.parametrize("text, words", [
    ("", []),
    ("   \t\n ", []),
    ("-c a=b", ["-c", "a=b"]),
    ("  -c   a=b  --x=y ", ["-c", "a=b", "--x=y"]),
    ("-c\ta=b\r\n-c\va=c\fd", ["-c", "a=b", "-c", "a=c", "d"]),
    (r"-c search_path=a\ b", ["-c", "search_path=a b"]),
    (r"-c a=\\", ["-c", "a=\\"]),  # an escaped backslash
    (r"-c a=x\y", ["-c", "a=xy"]),  # a backslash before anything takes it as it is
    ("-c a=b\\", ["-c", "a=b"]),  # a trailing backslash goes
    ("\\", [""]),  # ... leaving an empty word, which the server sees too
    ("\\  x", [" ", "x"]),
    ("a\u00a0b", ["a\u00a0b"]),  # only ASCII whitespace splits
])
def test_split_options(text: str, words: list[str]) -> None:
    assert split_options(text) == words


# --- parsing: the switches that set settings -----------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("", ()),
    ("-c search_path=public", (S("search_path", "public"),)),
    ("-csearch_path=public", (S("search_path", "public"),)),
    ("--search_path=public", (S("search_path", "public"),)),
    ("--statement-timeout=5s", (S("statement_timeout", "5s"),)),  # '-' reads as '_'
    ("-c statement-timeout=5s", (S("statement_timeout", "5s"),)),
    ("-c a=b=c", (S("a", "b=c"),)),  # the name ends at the first '='
    ("-c a=", (S("a", ""),)),
    (r"-c search_path=my\ schema,public -c statement_timeout=5s --lock-timeout=1s",
     (S("search_path", "my schema,public"), S("statement_timeout", "5s"), S("lock_timeout", "1s"))),
    ("-c --x=y", (S("__x", "y"),)),  # getopt: -c takes the next word, whatever it is
])
def test_parse_options(text: str, expected: tuple[Setting, ...]) -> None:
    assert parse_options(text) == expected


@pytest.mark.parametrize("text, phrase", [
    ("-c search_path", '-c "search_path" needs a value'),
    ("--search_path", '-- "search_path" needs a value'),
    ("-c =x", "needs a setting's name"),
    ("-c", "-c at the end needs NAME=VALUE"),
    ("-c a=b -c", "-c at the end"),
    ("--", "bare '--'"),
    ("search_path=x", '"search_path=x" is not a switch'),
    ("-", '"-" is not a switch'),
    ("\\", '"" is not a switch'),
    ("-c a=b\x00", "NUL"),
])
def test_options_the_server_could_not_read_are_a_syntax_error(text: str, phrase: str) -> None:
    err = refused(parse_options, text)
    assert err.wire_hint == SYNTAX and err.code is ErrorCode.BAD_REQUEST
    assert err.message.startswith("cannot read the options start-up parameter: ")
    assert phrase in err.message, err.message


@pytest.mark.parametrize("text, switch", [
    ("-d 5", '"-d"'), ("-B 100", '"-B"'), ("-E", '"-E"'), ("-Ec a=b", '"-E"'), ("-c a=b -O", '"-O"'),
])
def test_other_switches_are_not_allowed(text: str, switch: str) -> None:
    err = refused(parse_options, text)
    assert err.wire_hint == DENIED and err.code is ErrorCode.ACCESS_DENIED
    assert f"the {switch} switch in the options start-up parameter is not allowed" in err.message


def test_format_options_escapes_what_the_server_would_split_at() -> None:
    text = format_options([S("search_path", "my schema,\\odd\t"), S("application_name", "")])
    assert text == "-c search_path=my\\ schema,\\\\odd\\\t -c application_name="
    assert parse_options(text) == (S("search_path", "my schema,\\odd\t"), S("application_name", ""))
    assert format_options([]) == ""


def test_setting_validates_itself() -> None:
    for name in ("", "a=b", "a\x00"):
        with pytest.raises(ValueError):
            Setting(name=name, value="v")
    with pytest.raises(ValueError, match="NUL"):
        Setting(name="a", value="\x00")
    with pytest.raises(TypeError):
        Setting(name=1, value="v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Setting("a", "v")  # type: ignore[misc]  # keyword-only


# --- the allowlist ---------------------------------------------------------------------


def test_allowlist_compares_as_postgresql_compares_setting_names() -> None:
    assert all(name == name.lower() and name.isascii() for name in ALLOWED_SETTINGS)
    for name in ("search_path", "DateStyle", "TIMEZONE", "TimeZone", "application_name"):
        assert setting_allowed(name)
    # KELVIN SIGN lowers to "k" in Python, not in PostgreSQL.
    for name in ("log_statement", "role", "session_authorization", "local_preload_libraries",
                 "search-path", "loc\u212a_timeout", "", "search_path "):
        assert not setting_allowed(name), name


def test_session_parameters_passes_allowed_settings_and_rebuilds_options() -> None:
    startup = {
        "user": "app", "database": "app", "replication": "false", "_pq_.x": "y",
        "application_name": "psql", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
        "options": r"  --search-path=my\ schema   -cstatement_timeout=5s ",
    }
    assert session_parameters(startup) == {
        "application_name": "psql", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
        "options": r"-c search_path=my\ schema -c statement_timeout=5s",
    }
    assert session_parameters({"user": "app", "options": " \t "}) == {}  # nothing to set: not passed
    assert session_parameters({"user": "app"}) == {}


@pytest.mark.parametrize("startup, named", [
    ({"log_statement": "none"}, 'setting "log_statement" is'),
    ({"Role": "admin"}, 'setting "Role" is'),
    ({"application_name": "x", "options": "-c log_statement=none"},
     'setting "log_statement" in the options start-up parameter is'),
    ({"options": "-c search_path=x --local-preload-libraries=evil"},
     'setting "local_preload_libraries" in the options'),
    ({"options": "-c session_authorization=postgres"}, '"session_authorization"'),
    ({"x" * 100: "v"}, '"' + "x" * 64 + '..."'),
    ({"a\nb": "v"}, '"a\\nb"'),
])
def test_settings_outside_the_allowlist_are_refused_by_name(startup: dict[str, str], named: str) -> None:
    err = refused(session_parameters, {"user": "app", **startup})
    assert err.wire_hint == DENIED and err.code is ErrorCode.ACCESS_DENIED
    assert named in err.message, err.message
    assert "not allowed when connecting through Wicket" in err.message
    assert "remove it from PGOPTIONS" in err.message  # what to do


def test_a_refusal_never_quotes_a_value() -> None:
    err = refused(session_parameters, {"log_statement": "secret-value",
                                       "options": "-c password=secret-value"})
    assert "secret-value" not in err.message
    err = refused(session_parameters, {"options": "-c search_path=secret-value -c password=secret-value"})
    assert "secret-value" not in err.message and '"password"' in err.message


# --- fuzz -------------------------------------------------------------------------------

_names = st.text(st.characters(blacklist_characters="=\x00-", blacklist_categories=("Cs",)), min_size=1)
_values = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)))
_settings = st.lists(st.builds(Setting, name=_names, value=_values), max_size=6)


@fuzz
@given(_settings)
def test_format_then_parse_gives_the_same_settings(items: list[Setting]) -> None:
    assert parse_options(format_options(items)) == tuple(items)


_option_text = st.lists(st.one_of(
    st.sampled_from(["-c", "--", "-", "\\", " ", "\t", "=", "-c ", "--search-path=", "search_path=",
                     "log_statement=", "-d", "-E"]),
    st.text(max_size=8),
)).map("".join)


@fuzz
@given(_option_text)
def test_any_options_text_is_read_or_refused_clearly(text: str) -> None:
    try:
        items = parse_options(text)
    except RemoteProtocolError as err:
        assert err.wire_hint in (DENIED, SYNTAX) and err.message
        return
    # What is forwarded reads back as exactly what was checked.
    assert parse_options(format_options(items)) == items
    try:
        out = session_parameters({"user": "u", "options": text})
    except RemoteProtocolError as err:
        assert err.wire_hint == DENIED
        assert any(not setting_allowed(s.name) for s in items)
        return
    assert all(setting_allowed(s.name) for s in items)
    assert parse_options(out.get("options", "")) == items
