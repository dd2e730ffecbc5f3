"""What clients are told: gateway/local/pg_client.py, mongo_client.py, client_files.py, ports.py,
serving.env_name."""

import os
import stat

from gateway import kinds
from gateway.local import client_files, mongo_client, pg_client, ports
from gateway.local.serving import env_name


def test_postgres_client_environment():
    env = kinds.get("postgres").client_environment("pg", "127.0.0.1", 5433, {"db_user": "app", "db_name": "a b"})
    assert env == {"PGHOST": "127.0.0.1", "PGPORT": "5433", "PGSSLMODE": "disable", "PGUSER": "app",
                   "PGDATABASE": "a b", "DATABASE_URL": "postgresql://app@127.0.0.1:5433/a%20b?sslmode=disable"}
    env = pg_client.client_env("pg", "::1", 5433, {"local_tls": True})
    assert env["DATABASE_URL"] == "postgresql://[::1]:5433?sslmode=require" and "PGUSER" not in env
    assert kinds.get("tcp").client_environment("echo", "127.0.0.1", 1, {}) == {}


def test_mongodb_client_environment_says_tls_as_the_printed_uri_does():
    env = kinds.get("mongodb").client_environment("m", "127.0.0.1", 27018, {"db_name": "app", "wicket_home": "/h"})
    assert env == {"MONGODB_URI": "mongodb://127.0.0.1:27018/app?directConnection=true"}
    env = mongo_client.client_env("m", "::1", 1, {"local_tls": True, "wicket_home": "/home/a b/.wicket"})
    assert env["MONGODB_URI"] == ("mongodb://[::1]:1/?directConnection=true&tls=true"
                                  "&tlsCAFile=/home/a%20b/.wicket/local-ca.crt")
    env = mongo_client.client_env("m", "127.0.0.1", 1, {"local_tls_client_cert": True, "wicket_home": "/h"})
    assert env["MONGODB_URI"].endswith("&tls=true&tlsCAFile=/h/local-ca.crt&tlsCertificateKeyFile=/h/local-client.pem")


def test_a_service_entry_replaces_its_own_section_only():
    entry = pg_client.service_entry("pg", "127.0.0.1", 5433, {"db_user": "app"})
    assert "[pg]\n" in entry and "port=5433\n" in entry and "user=app\n" in entry
    text = "# mine\n[other]\nhost=x\n\n[pg]\nhost=old\nport=1\n[last]\nport=2"
    merged = client_files.merge_ini_section(text, "pg", entry)
    assert merged.startswith("# mine\n[other]\nhost=x\n\n[pg]\n") and "port=1" not in merged
    assert merged.endswith("[last]\nport=2") and merged.count("[pg]") == 1
    assert client_files.merge_ini_section("", "pg", entry) == entry
    assert client_files.merge_ini_section("[a]\nx=1", "pg", entry) == "[a]\nx=1\n\n" + entry


def test_files_are_written_private_when_new_and_keep_their_mode(tmp_path):
    path = tmp_path / "pg_service.conf"
    client_files.update(path, "[a]\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o640)
    client_files.update(path, "[b]\n")
    assert path.read_text() == "[b]\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_ports_are_remembered_per_resource(tmp_path):
    first = ports.assign(tmp_path, "pg")
    assert ports.assign(tmp_path, "pg") == first
    assert ports.assign(tmp_path, "echo") != first
    assert ports.load(tmp_path) == {"pg": first, "echo": ports.load(tmp_path)["echo"]}
    (tmp_path / ports.FILE).write_text("not json")
    assert ports.load(tmp_path) == {}


def test_env_names():
    assert env_name("pg-prod.eu") == "PG_PROD_EU"
