"""The cluster's HTTP API, from the gateway: the CA bootstrap (checked
against the pin by the caller), login, and authenticated calls.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
from cryptography import x509

from gateway.addresses import parse_hostport
from gateway.identity import pki, tlsconf
from gateway.local.connect import CONNECT_TIMEOUT, ClusterError, connect_cluster
from gateway.local.profile import Profile
from gateway.net.http import HTTPClient, HTTPError


@attrs.frozen(slots=True)
class ClusterCA:
    name: str
    pem: bytes
    pin: str
    fingerprint: str


async def fetch_ca(address: str) -> ClusterCA:
    """Fetch the cluster's host CA over an unauthenticated TLS connection; the
    caller accepts it only if it matches the pin."""
    host, port = parse_hostport(address)
    stream = await connect_cluster(host, port, tlsconf.bootstrap_context(), None)
    async with stream:
        with trio.fail_after(CONNECT_TIMEOUT):
            doc = await HTTPClient(stream, host).request("GET", "/v1/ca")
    try:
        received = doc["host_ca"].encode("ascii")
        certs = x509.load_pem_x509_certificates(received)
    except (KeyError, AttributeError, ValueError, UnicodeEncodeError):
        raise ClusterError("bad_answer", "the cluster sent no usable CA certificate") from None
    if len(certs) != 1:
        # Only what the pin covers may be trusted: an extra certificate in the
        # bundle would be trusted too, unpinned.
        raise ClusterError("bad_answer", "the cluster sent more than one CA certificate; refusing it")
    cert = certs[0]
    return ClusterCA(
        name=str(doc.get("cluster", "")),
        pem=pki.cert_to_pem(cert),  # re-encoded: exactly the pinned certificate, nothing else
        pin=pki.public_key_pin(cert.public_key()),
        fingerprint=pki.cert_fingerprint(cert),
    )


async def login(
    address: str,
    ca: ClusterCA,
    *,
    user: str,
    password: str,
    totp_code: str | None,
    ttl_seconds: float | None,
    public_key_pem: str,
) -> dict[str, Any]:
    host, port = parse_hostport(address)
    ctx = tlsconf.gateway_client_context(ca.pem, alpn=(tlsconf.ALPN_HTTP,))
    stream = await connect_cluster(host, port, ctx, host)
    body: dict[str, Any] = {"user": user, "password": password, "public_key": public_key_pem}
    if totp_code:
        body["totp_code"] = totp_code
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    async with stream:
        with trio.fail_after(60):
            return await _api(HTTPClient(stream, host), "POST", "/v1/login", body)


async def _api(client: HTTPClient, method: str, path: str, body: Any = None) -> Any:
    try:
        return await client.request(method, path, body)
    except HTTPError as exc:
        raise ClusterError(exc.code, exc.message) from None


async def api_call(profile: Profile, method: str, path: str, body: Any = None) -> Any:
    stream = await connect_cluster(profile.host, profile.port, profile.client_context((tlsconf.ALPN_HTTP,)),
                            profile.host)
    async with stream:
        with trio.fail_after(60):
            return await _api(HTTPClient(stream, profile.host), method, path, body)
