"""HTTPS upstreams: certificate verification (private CA via --upstream-ca) and SNI."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import List, Tuple

import trustme

from tests.support.client import request, running_proxy
from tests.support.origin import MODELS_BODY, Origin


def _origin_tls(ca: trustme.CA, *names: str) -> Tuple[ssl.SSLContext, List[str]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    sni_seen: List[str] = []

    def record_sni(sslobj: ssl.SSLObject, name: str, ctx: ssl.SSLContext) -> None:
        sni_seen.append(name)

    context.sni_callback = record_sni  # type: ignore[assignment]
    return context, sni_seen


async def test_https_upstream_with_private_ca_and_sni(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context, sni_seen = _origin_tls(ca, "localhost")
    async with Origin(ssl=context) as origin:
        upstream = f"https://localhost:{origin.port}"
        async with running_proxy(upstream, upstream_ca=str(ca_file)) as proxy:
            for _ in range(3):
                resp = await request(proxy.port, b"GET", b"/v1/models")
                assert resp.status == 200 and resp.body == MODELS_BODY
            assert proxy.pool.stats.connects == 1  # TLS connections are pooled too
        assert sni_seen == ["localhost"]
        assert origin.requests[0].header(b"host") == f"localhost:{origin.port}".encode()


async def test_https_upstream_untrusted_certificate_is_502() -> None:
    ca = trustme.CA()
    context, _ = _origin_tls(ca, "localhost")
    async with Origin(ssl=context) as origin:
        # system CAs do not know our test CA
        async with running_proxy(f"https://localhost:{origin.port}") as proxy:
            resp = await request(proxy.port, b"GET", b"/v1/models")
            assert resp.status == 502
            message = resp.json()["error"]["message"]
            assert "TLS handshake" in message and "CERTIFICATE_VERIFY_FAILED" in message
        assert origin.requests == []


async def test_https_upstream_wrong_hostname_is_502(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context, _ = _origin_tls(ca, "some-other-host.test")
    async with Origin(ssl=context) as origin:
        async with running_proxy(f"https://localhost:{origin.port}", upstream_ca=str(ca_file)) as proxy:
            resp = await request(proxy.port, b"GET", b"/v1/models")
            assert resp.status == 502
            assert "TLS handshake" in resp.json()["error"]["message"]
        assert origin.requests == []
