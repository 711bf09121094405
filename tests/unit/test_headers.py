"""The header rules, without sockets."""

from __future__ import annotations

import pytest

from pyproxy.errors import BadRequest
from pyproxy.http.headers import (
    client_response_headers,
    connection_tokens,
    redact,
    request_framing,
    to_origin_form,
    upstream_request_headers,
)


def test_connection_tokens_are_lowercased_trimmed_and_merged() -> None:
    headers = [(b"connection", b"Keep-Alive, X-Foo ,,"), (b"connection", b"x-bar"), (b"x-foo", b"1")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-foo", b"x-bar"}


def test_request_framing() -> None:
    assert request_framing([(b"content-length", b"12")]).content_length == 12
    framing = request_framing([(b"transfer-encoding", b"chunked")])
    assert framing.chunked and framing.has_body
    assert not request_framing([]).has_body
    assert not request_framing([(b"content-length", b"0")]).has_body
    with pytest.raises(BadRequest, match="both Content-Length and Transfer-Encoding"):
        request_framing([(b"content-length", b"3"), (b"transfer-encoding", b"chunked")])


@pytest.mark.parametrize(
    "target, expected",
    [
        (b"/v1/models", b"/v1/models"),
        (b"/a?b=c", b"/a?b=c"),
        (b"*", b"*"),
        (b"http://host/v1/models?x=1", b"/v1/models?x=1"),
        (b"HTTPS://host:8443", b"/"),
        (b"http://host?q=1", b"/?q=1"),
    ],
)
def test_to_origin_form(target: bytes, expected: bytes) -> None:
    assert to_origin_form(target) == expected


@pytest.mark.parametrize("target", [b"host:443", b"ftp://host/x", b"v1/models"])
def test_to_origin_form_rejects(target: bytes) -> None:
    with pytest.raises(BadRequest):
        to_origin_form(target)


def test_upstream_request_headers_rewrites_for_the_upstream() -> None:
    incoming = [
        (b"host", b"proxy.example"),
        (b"connection", b"keep-alive, x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"300"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"expect", b"100-continue"),
        (b"content-length", b"5"),
        (b"x-forwarded-for", b"10.0.0.1"),
        (b"x-forwarded-proto", b"https"),
        (b"via", b"1.0 edge"),
        (b"authorization", b"Bearer sk"),
        (b"x_weird", b"1"),
    ]
    out = upstream_request_headers(
        incoming,
        upstream_host=b"api.example:8000",
        client_ip=b"127.0.0.1",
        scheme=b"http",
        framing=request_framing([(b"content-length", b"5")]),
    )
    assert out[0] == (b"host", b"api.example:8000")
    names = [n for n, _ in out]
    for gone in (b"connection", b"x-hop", b"keep-alive", b"te", b"upgrade", b"expect", b"x_weird"):
        assert gone not in names
    d = dict(out)
    assert d[b"x-forwarded-for"] == b"10.0.0.1, 127.0.0.1"
    assert d[b"x-forwarded-proto"] == b"http"
    assert d[b"x-forwarded-host"] == b"proxy.example"
    assert d[b"via"] == b"1.0 edge, 1.1 pyproxy"
    assert d[b"authorization"] == b"Bearer sk"
    assert d[b"content-length"] == b"5"
    assert names.count(b"content-length") == 1


def test_upstream_request_headers_chunked_and_underscores_allowed() -> None:
    out = upstream_request_headers(
        [(b"host", b"h"), (b"transfer-encoding", b"chunked"), (b"x_custom", b"1")],
        upstream_host=b"u",
        client_ip=b"::1",
        scheme=b"http",
        framing=request_framing([(b"transfer-encoding", b"chunked")]),
        allow_underscores=True,
    )
    assert (b"transfer-encoding", b"chunked") in out
    assert (b"x_custom", b"1") in out


def test_client_response_headers_reframe() -> None:
    out = client_response_headers(
        [
            (b"content-type", b"application/json"),
            (b"content-length", b"10"),
            (b"connection", b"close, x-internal"),
            (b"x-internal", b"secret"),
            (b"keep-alive", b"timeout=5"),
        ]
    )
    assert out == [(b"content-type", b"application/json"), (b"via", b"1.1 pyproxy"), (b"content-length", b"10")]
    # Transfer-Encoding wins over Content-Length: the length is not declared
    out = client_response_headers([(b"content-length", b"10"), (b"transfer-encoding", b"chunked")])
    assert out == [(b"via", b"1.1 pyproxy")]


def test_redact_hides_credentials() -> None:
    out = dict(redact([(b"Authorization", b"Bearer sk-live"), (b"x-api-key", b"k"), (b"accept", b"*/*")]))
    assert out[b"Authorization"] == b"[redacted]" and out[b"x-api-key"] == b"[redacted]"
    assert out[b"accept"] == b"*/*"
