"""MySQL/MariaDB commands the cluster answers itself, end to end (real
MariaDB, cluster, gateway, clients): a ``USE`` or COM_INIT_DB of a
database the roles do not allow (ERR 1044, the session goes on), and
COM_CHANGE_USER re-dialled as the new db user (held by the session's
message filter while the re-dial runs)."""

from __future__ import annotations

import pytest

pymysql = pytest.importorskip("pymysql")

from tests.integration.mysqlenv import gw, my_env, my_port, mysql, pw_port  # noqa: E402,F401  (fixtures)


def test_use_of_a_database_the_role_does_not_allow_is_refused_and_the_session_goes_on(my_port, my_env, gw):
    """The cluster answers it (ERR 1044) in the command's place; the server
    never sees it, the session goes on in the database it had."""
    cluster, _ = my_env
    r = mysql(my_port, "-e", "use app_other; select database(); use secret")  # the CLI's use: COM_INIT_DB
    assert "ERROR 1044 (42000)" in r.stderr and "db_name=secret" in r.stderr, r.stderr
    assert "ask a cluster administrator" in r.stderr.lower(), r.stderr
    assert r.stdout.split() == ["app_other"]
    r = mysql(my_port, "--force", input="use secret\nselect database();\n\\u secret\nselect 'still here';\n")
    assert r.stderr.count("ERROR 1044 (42000)") == 2, r.stderr
    assert r.stdout.split() == ["app", "still", "here"]
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        for use in (lambda: conn.select_db("secret"),  # COM_INIT_DB
                    lambda: conn.cursor().execute("/* as a statement */ USE `secret`"),
                    lambda: conn.cursor().execute("/*!USE secret*/"),  # the server runs what it holds
                    lambda: conn.cursor().execute("select 1; use secret"),
                    # Comments between USE and the name (MariaDB reads past them: below).
                    lambda: conn.cursor().execute("use/**/secret"),
                    lambda: conn.cursor().execute("use /* x */ `secret`"),
                    lambda: conn.cursor().execute("use -- x\n secret"),
                    lambda: conn.cursor().execute("use#x\nsecret")):
            with pytest.raises(pymysql.err.OperationalError) as info:
                use()
            assert info.value.args[0] == 1044
            with conn.cursor() as cur:  # the session goes on, in the database it had
                cur.execute("select 1")
                assert cur.fetchone() == (1,)
                cur.execute("select database()")
                assert cur.fetchone() == ("app",)
        conn.select_db("app_other")  # an allowed one goes through
        with conn.cursor() as cur:
            cur.execute("select database()")
            assert cur.fetchone() == ("app_other",)
            # The server does switch through such comments: the forms above
            # are USEs, not errors.
            for use, db in (("use/**/app", "app"), ("use -- x\n app_other", "app_other"),
                            ("use#x\napp", "app"), ("use /* x */`app_other`", "app_other")):
                cur.execute(use)
                cur.execute("select database()")
                assert cur.fetchone() == (db,), use
    finally:
        conn.close()
    refused = cluster.wait_audit(lambda evs: sum(e["schema"] == "secret" for e in evs) >= 10,
                                 user=gw.user, event="mysql.init_db")
    assert not any(e["allowed"] for e in refused if e["schema"] == "secret")


def test_change_user_redials_as_the_new_db_user(pw_port, my_port, my_env, gw):
    """COM_CHANGE_USER (mysqlclient's change_user, libmariadb's
    mysql_change_user): the cluster checks the roles for the new db user
    and database, logs in as it on a new connection and switches the
    session to it; a refusal is an ERR and the session stays as it was."""
    MySQLdb = pytest.importorskip("MySQLdb")
    cluster, _ = my_env

    def who(conn) -> tuple:
        cur = conn.cursor()
        cur.execute("select current_user(), database(), connection_id()")
        return cur.fetchone()

    conn = MySQLdb.connect(host="127.0.0.1", port=pw_port, user="nativeuser", password="", database="app")
    try:
        _, _, first = who(conn)
        conn.change_user("eduser", "", "app")  # password auth: the cluster's secret for eduser
        user, db, thread = who(conn)
        assert (user, db) == ("eduser@%", "app") and thread != first
        for user, errno, words in (("root", 1045, "db_user=root"),  # the role does not allow it
                                   ("nobody", 1045, "no credentials for db user 'nobody'")):
            with pytest.raises(MySQLdb.MySQLError) as info:
                conn.change_user(user, "", "app")
            assert info.value.args[0] == errno and words in info.value.args[1], info.value
            assert "stays db user 'eduser'" in info.value.args[1], info.value
            assert who(conn)[:2] == ("eduser@%", "app")  # the session goes on as it was
        conn.change_user("nativeuser", "", "app")
        assert who(conn)[:2] == ("nativeuser@%", "app")
    finally:
        conn.close()
    conn = MySQLdb.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        conn.change_user("app", "", "app_other")  # certificate auth; another database the role allows
        assert who(conn)[:2] == ("app@%", "app_other")
        with pytest.raises(MySQLdb.MySQLError) as info:
            conn.change_user("app", "", "secret")
        assert info.value.args[0] == 1044 and "db_name=secret" in info.value.args[1], info.value
        assert who(conn)[:2] == ("app@%", "app_other")
    finally:
        conn.close()
    events = cluster.wait_audit(lambda evs: len(evs) >= 6, user=gw.user, event="mysql.change_user")
    outcomes = [(e["username"], e["refused"]) for e in events]
    assert ("eduser", False) in outcomes and ("root", True) in outcomes and ("nobody", True) in outcomes
    assert any(e["outcome"].startswith("switched") for e in events)


def test_change_user_by_hand_without_a_driver_api(my_port):
    """PyMySQL has no change_user: the packet by hand, to a db user the
    role does not allow; the answer is the ERR, then the session goes on."""
    from pymysql.constants import COMMAND
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        conn._execute_command(COMMAND.COM_CHANGE_USER, b"root\x00\x00app\x00")
        with pytest.raises(pymysql.err.MySQLError) as info:
            conn._read_packet()
        assert info.value.args[0] == 1045 and "stays db user 'app'" in info.value.args[1]
        with conn.cursor() as cur:
            cur.execute("select current_user()")
            assert cur.fetchone() == ("app@%",)
    finally:
        conn.close()


def test_reset_connection_is_the_servers(my_port):
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        with conn.cursor() as cur:
            cur.execute("set @kept = 1")
        conn._execute_command(0x1F, b"")  # COM_RESET_CONNECTION
        conn._read_ok_packet()
        with conn.cursor() as cur:
            cur.execute("select @kept, current_user()")
            assert cur.fetchone() == (None, "app@%")
    finally:
        conn.close()


def test_a_use_anywhere_in_a_long_statement_is_read(my_port):
    """The whole statement is read for a USE, however far in: behind a
    leading comment longer than what a statement's audit record keeps,
    or behind a long first statement."""
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app",
                           client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    try:
        for statement in ("/* " + "x" * 40_000 + " */ use secret",
                          "select '" + "y" * 40_000 + "'; use secret"):
            with pytest.raises(pymysql.err.OperationalError) as info:
                conn.cursor().execute(statement)
            assert info.value.args[0] == 1044
            with conn.cursor() as cur:
                cur.execute("select database()")
                assert cur.fetchone() == ("app",)
    finally:
        conn.close()


def test_what_a_client_sends_behind_its_change_user_waits_for_the_answer(my_port):
    """A client that does not wait for COM_CHANGE_USER's answer: its next
    command is held (not sent to the old connection, not lost) and runs
    on the new one, after the answer."""
    from pymysql.connections import MySQLResult
    from pymysql.constants import COMMAND
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        conn._execute_command(COMMAND.COM_CHANGE_USER, b"app\x00\x00app_other\x00")
        conn._execute_command(COMMAND.COM_QUERY, b"select database()")  # before the answer
        assert conn._read_packet().is_ok_packet()
        conn._next_seq_id = 1  # the query's result, numbered as its own
        result = MySQLResult(conn)
        result.read()
        assert result.rows == (("app_other",),)
        with conn.cursor() as cur:
            cur.execute("select database()")
            assert cur.fetchone() == ("app_other",)
    finally:
        conn.close()
