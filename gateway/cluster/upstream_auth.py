"""TLS to database servers, and the client certificates the cluster logs in with.

Shared by every database kind (PostgreSQL today; MySQL and MongoDB next): a
resource's :class:`~gateway.cluster.resource_specs.DatabaseSpec` says how
the server is verified (``tls``, ``ca_file``, ``server_name``) and how the
cluster logs in (``auth``). With ``auth = "cert"`` the cluster presents a
client certificate with CN = the db user, valid for :data:`DB_CERT_TTL`,
signed by its database client CA, which the server trusts; no password
exists anywhere. The key and certificate live only in memory (an anonymous
memfd handed to OpenSSL, closed at once), never on disk.

Building a context costs ~1.5 ms of CPU (OpenSSL 3 parses the CA file and
the key anew each time), more than the rest of the cluster's work for a
connection, so :class:`ClientContexts` keeps each one for half its
certificate's validity (:data:`CONTEXT_REUSE`).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import time

from gateway.cluster.resource_specs import DatabaseSpec
from gateway.identity import pki

DB_CERT_TTL = dt.timedelta(minutes=5)
#: How long one client certificate (and its TLS context) serves new
#: connections: half its validity.
CONTEXT_REUSE = DB_CERT_TTL / 2


class ClientContexts:
    """TLS client contexts for connections to database servers, reused while
    they are fresh. A context depends on the resource's TLS settings, the
    CA file's contents (its identity on disk, checked with one ``stat`` per
    use, so a replaced file is read again at once), the database client CA
    and, for ``auth = "cert"``, the db user. One with a client certificate
    is reused for half the certificate's validity (:data:`CONTEXT_REUSE`),
    so the certificate a server checks always has minutes left; the key
    never leaves memory either way. That half is counted on both clocks:
    the monotonic one (which a wall-clock step does not move) and the wall
    clock (which goes on while the machine is suspended, as a certificate's
    validity does)."""

    def __init__(self, limit: int = 256) -> None:
        self._limit = limit
        # key -> (context, monotonic deadline, wall-clock deadline)
        self._entries: dict[tuple, tuple[ssl.SSLContext, float, float]] = {}

    def get(self, db_client_ca: pki.CertificateAuthority, spec: DatabaseSpec, db_user: str) -> ssl.SSLContext:
        ca_file = None
        if spec.tls == "verify-full":
            try:
                st = os.stat(spec.ca_file)
            except OSError:
                return build_context(db_client_ca, spec, db_user)  # it reports the missing file
            ca_file = (str(spec.ca_file), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        key = (spec.tls, ca_file, spec.auth, db_client_ca.cert.serial_number,
               db_user if spec.auth == "cert" else None)
        mono, wall = time.monotonic(), time.time()
        entry = self._entries.get(key)
        if entry is not None and mono < entry[1] and wall < entry[2]:
            return entry[0]
        ctx = build_context(db_client_ca, spec, db_user)
        self._entries.pop(key, None)
        if len(self._entries) >= self._limit:
            # Drop the stale ones; if none is, the oldest (dicts keep order).
            self._entries = {k: v for k, v in self._entries.items() if mono < v[1] and wall < v[2]}
            while len(self._entries) >= self._limit:
                del self._entries[next(iter(self._entries))]
        reuse = CONTEXT_REUSE.total_seconds()
        self._entries[key] = (ctx, mono + reuse, wall + reuse)
        return ctx


def build_context(db_client_ca: pki.CertificateAuthority, spec: DatabaseSpec, db_user: str) -> ssl.SSLContext:
    """A new TLS client context for ``spec`` (a client certificate for
    ``db_user`` in it when ``spec.auth == "cert"``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # what database servers speak today
    if spec.tls == "verify-full":
        ctx.load_verify_locations(cafile=str(spec.ca_file))
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # "require": encrypted, server not authenticated (libpq's meaning)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if spec.auth == "cert":
        key = pki.generate_key()
        cert = db_client_ca.issue_client_cert(key.public_key(), db_user, now=pki.utcnow(), ttl=DB_CERT_TTL)
        fd_cert, cert_path = _memfd_pem(pki.cert_to_pem(cert))
        fd_key, key_path = _memfd_pem(pki.key_to_pem(key))
        try:
            ctx.load_cert_chain(cert_path, key_path)
        finally:
            os.close(fd_cert)
            os.close(fd_key)
    return ctx


def _memfd_pem(data: bytes) -> tuple[int, str]:
    """An anonymous in-memory file holding ``data``, and a path OpenSSL
    can open it by (this process only)."""
    fd = os.memfd_create("wicket-db-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd, f"/proc/self/fd/{fd}"
