"""The fast path is h11, only faster: a differential test against h11 on the same bytes.

For every input the fast parser either declines (FALLBACK / NEED_MORE, and
then h11 decides) or returns exactly what h11 returns: method, target,
version, header list, body framing, keep-alive, and where the head ends. The
writers are checked the other way round: h11 parses what they write back into
the same message.
"""

from __future__ import annotations

import os
import re
from typing import Any, List, Optional, Tuple

import h11
import h11._abnf as abnf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyproxy.http import fastpath
from pyproxy.http.fastpath import (
    FALLBACK,
    LAST_CHUNK,
    NEED_MORE,
    ChunkedDecoder,
    ChunkError,
    FastRequest,
    FastResponse,
    chunk_pieces,
    parse_request_head,
    parse_response_head,
    serialize_request_head,
    serialize_response_head,
)

EXAMPLES = int(os.environ.get("PYPROXY_FUZZ_EXAMPLES", "300"))


def test_grammar_copies_match_h11() -> None:
    """A tripwire: if h11 changes its grammar, the copies must follow."""
    assert fastpath.OWS == abnf.OWS.encode()
    assert fastpath.TOKEN == abnf.token.encode()
    assert fastpath.VCHAR == abnf.vchar.encode()
    assert fastpath.VCHAR_OR_OBS_TEXT == abnf.vchar_or_obs_text.encode()
    # h11's field_value is (field_content)?; ours is the same without a group name
    assert re.sub(rb"\(\?:", b"(", fastpath.FIELD_VALUE) == abnf.field_value.encode().replace(
        abnf.field_content.encode(), re.sub(rb"\(\?:", b"(", fastpath.FIELD_CONTENT)
    )
    assert fastpath.REASON_PHRASE.replace(b"(?:", b"(") == abnf.reason_phrase.encode()


# --- h11 as the oracle -------------------------------------------------------------


def h11_request(data: bytes) -> Tuple[str, Any]:
    """('request', (Request, framing, keep_alive)) | ('need-data', None) | ('error', None)"""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "error", None
    if event is h11.NEED_DATA:
        return "need-data", None
    assert isinstance(event, h11.Request)
    # framing, as h11's reader will apply it
    cl = [v for k, v in event.headers if k == b"content-length"]
    te = [v for k, v in event.headers if k == b"transfer-encoding"]
    framing = ("chunked", None) if te else ("length", int(cl[0]) if cl else 0)
    # keep-alive, as h11 decides it: answer and see whether it must close
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    return "request", (event, framing, conn.our_state is not h11.MUST_CLOSE)


def check_request(data: bytes) -> Optional[FastRequest]:
    fast = parse_request_head(data)
    if fast is FALLBACK:
        return None
    oracle, result = h11_request(data)
    if fast is NEED_MORE:
        assert oracle in ("need-data", "error"), (data, oracle)
        return None
    assert isinstance(fast, FastRequest)
    assert oracle == "request", (data, oracle)
    event, framing, keep_alive = result
    assert fast.method == event.method
    assert fast.target == event.target
    assert event.http_version == b"1.1"
    assert fast.headers == list(event.headers)
    assert framing == ("length", fast.content_length)
    assert fast.keep_alive == keep_alive
    # the head ends exactly where h11's does
    assert h11_request(data[: fast.head_length])[0] == "request"
    assert h11_request(data[: fast.head_length - 1])[0] != "request"
    return fast


def h11_response(data: bytes, method: bytes) -> Tuple[str, Any]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "error", None
    if event is h11.NEED_DATA:
        return "need-data", None
    if not isinstance(event, h11.Response):
        return "other", event
    cl = [v for k, v in event.headers if k == b"content-length"]
    te = [v for k, v in event.headers if k == b"transfer-encoding"]
    framing = ("chunked", None) if te else ("length", int(cl[0])) if cl else ("close", None)
    return "response", (event, framing, h11._connection._keep_alive(event))  # type: ignore[attr-defined]


def check_response(data: bytes, method: bytes = b"GET") -> Optional[FastResponse]:
    fast = parse_response_head(data, method)
    if fast is FALLBACK:
        return None
    oracle, result = h11_response(data, method)
    if fast is NEED_MORE:
        assert oracle in ("need-data", "error"), (data, oracle)
        return None
    assert isinstance(fast, FastResponse)
    assert oracle == "response", (data, oracle, result)
    event, framing, keep_alive = result
    assert fast.status == event.status_code
    assert fast.reason == event.reason
    assert fast.headers == list(event.headers)
    if fast.content_length == -1:
        assert framing == ("chunked", None)
    else:
        assert framing == ("length", fast.content_length)
    assert fast.keep_alive == keep_alive
    assert h11_response(data[: fast.head_length], method)[0] == "response"
    return fast


# --- a corpus of hand-picked cases ---------------------------------------------------

REQUESTS = [
    b"GET /v1/models HTTP/1.1\r\nHost: api\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer sk-1\r\nAccept: */*\r\n\r\n",
    b'POST /v1/chat/completions HTTP/1.1\r\nHost: api\r\nContent-Length: 12\r\n\r\n{"a": true}\n',
    b"POST /x HTTP/1.1\r\nHOST: a\r\ncontent-LENGTH:   7  \r\n\r\n1234567",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Obs: caf\xc3\xa9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Ctl: a\x01b\r\n\r\n",
    b"GET /?q=a%20b HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",  # incomplete
    b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r",  # incomplete
    # must not be fast
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx",
    b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX:\r\n\r\n",
]


@pytest.mark.parametrize("data", REQUESTS)
def test_request_corpus(data: bytes) -> None:
    check_request(data)


def test_common_requests_do_take_the_fast_path() -> None:
    assert check_request(REQUESTS[0]) is not None
    post = check_request(REQUESTS[2])
    assert post is not None and post.content_length == 12
    assert check_request(REQUESTS[4]).keep_alive is False  # type: ignore[union-attr]


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\nnope",
    b"HTTP/1.1 500 Internal\tServer Error\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=b\r\nSet-Cookie: c=d\r\n\r\nhello",
    # must not be fast
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
]


@pytest.mark.parametrize("data", RESPONSES)
@pytest.mark.parametrize("method", [b"GET", b"POST", b"HEAD"])
def test_response_corpus(data: bytes, method: bytes) -> None:
    check_response(data, method)


def test_common_responses_do_take_the_fast_path() -> None:
    assert check_response(RESPONSES[0]) is not None
    chunked = check_response(RESPONSES[6])
    assert chunked is not None and chunked.content_length == -1
    assert check_response(RESPONSES[3]).keep_alive is False  # type: ignore[union-attr]
    assert parse_response_head(RESPONSES[0], b"HEAD") is FALLBACK


# --- generated inputs ------------------------------------------------------------------

TRICKY = st.sampled_from(
    [b"a", b"Z", b"-", b"_", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff",
     b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x85", b"\xa0", b"@", b"(", b"/",
     b"0", b"9", b",", b";", b"=", b"\"", b"close", b"keep-alive", b"chunked", b"content-length", b"host",
     b"transfer-encoding", b"connection", b"expect"]
)  # fmt: skip
# Mostly well-formed pieces with a few bad ones, so that many inputs reach
# the fast path and the rest probe its edges.
NAMES = st.sampled_from(
    [b"X-A", b"Authorization", b"Accept", b"User-Agent", b"x-b", b"X_Under", b"Connection", b"Content-Type",
     b"X-A", b"Accept", b"Cookie", b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade",
     b"bad name", b"", b"x:y", b"X\x80"]
)  # fmt: skip
VALUES = st.one_of(
    st.sampled_from([b"", b"0", b"12", b"007", b"1, 1", b"-1", b"close", b"Keep-Alive, close", b"keep-alive",
                     b"chunked", b" a ", b"\ta\t", b"100-continue", b"x" * 40, b"Bearer sk-1", b"a b  c",
                     b"application/json", b"*/*"]),
    st.lists(TRICKY, max_size=8).map(b"".join),
)  # fmt: skip
SEPARATORS = st.sampled_from([b": "] * 6 + [b":", b" : ", b":\t", b":  "])
LINE_ENDS = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r"])


@st.composite
def header_blocks(draw: Any) -> bytes:
    lines: List[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        lines.append(draw(NAMES) + draw(SEPARATORS) + draw(VALUES) + draw(LINE_ENDS))
    return b"".join(lines)


@st.composite
def request_bytes(draw: Any) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"GET", b"POST", b"G T", b"CONNECT", b""]))
    target = draw(st.sampled_from([b"/", b"/v1/models", b"/a?b=c", b"http://h/x", b"*", b"/\x80", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]))
    host = draw(st.sampled_from([b"Host: a\r\n"] * 6 + [b"", b"Host: a\r\nHost: b\r\n", b"host:a\r\n"]))
    length = draw(st.sampled_from([b"", b"", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n"]))
    end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b""]))
    body = draw(st.binary(max_size=16))
    return method + b" " + target + b" " + version + b"\r\n" + host + draw(header_blocks()) + length + end + body


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_bytes())
def test_generated_requests_match_h11(data: bytes) -> None:
    check_request(data)


@st.composite
def response_bytes(draw: Any) -> bytes:
    status = draw(st.sampled_from([b"200 OK", b"200 OK", b"200", b"201 Created", b"204 No Content", b"304 X",
                                   b"101 S", b"404 Not\tFound", b"99 X", b"200 O\x00K", b"500 "]))  # fmt: skip
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"]))
    length = draw(
        st.sampled_from(
            [b"Content-Length: 3\r\n"] * 3
            + [b"Content-Length: 0\r\n", b"", b"Transfer-Encoding: chunked\r\n", b"transfer-encoding: CHUNKED\r\n"]
        )
    )
    end = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b""]))
    return version + b" " + status + b"\r\n" + draw(header_blocks()) + length + end + draw(st.binary(max_size=16))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response_bytes(), st.sampled_from([b"GET", b"HEAD", b"POST"]))
def test_generated_responses_match_h11(data: bytes, method: bytes) -> None:
    check_response(data, method)


# --- the writers, read back by h11 ------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"x-a", b"authorization", b"content-type"]), st.sampled_from([b"1", b"a b", b""])),
        max_size=4,
    ),
    st.lists(st.binary(max_size=20), max_size=4),
    st.booleans(),
)
def test_written_request_reads_back_identically(
    headers: List[Tuple[bytes, bytes]], chunks: List[bytes], chunked: bool
) -> None:
    body = b"".join(chunks)
    framing = [(b"transfer-encoding", b"chunked")] if chunked else [(b"content-length", str(len(body)).encode())]
    all_headers = [(b"host", b"up")] + headers + framing
    wire = [serialize_request_head(b"POST", b"/v1/x?y=1", all_headers)]
    for chunk in chunks:
        if chunked:
            if chunk:
                wire += chunk_pieces(chunk)
        else:
            wire.append(chunk)
    if chunked:
        wire.append(LAST_CHUNK)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"".join(wire))
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert event.method == b"POST" and event.target == b"/v1/x?y=1"
    assert list(event.headers) == all_headers
    received = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            received += event.data
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    assert received == body


@pytest.mark.parametrize("status, reason", [(200, b"OK"), (404, b""), (503, b"Service Unavailable")])
def test_written_response_head_reads_back_identically(status: int, reason: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(serialize_response_head(status, reason, headers) + b"ok")
    event = conn.next_event()
    assert isinstance(event, h11.Response)
    assert (event.status_code, event.reason, list(event.headers)) == (status, reason, headers)


# --- chunked bodies: ChunkedDecoder against h11's ChunkedReader ----------------------------


def h11_chunked(body: bytes) -> Tuple[str, bytes, bytes]:
    """('done' | 'need-data' | 'error', data, bytes left after the message)"""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body)
    data = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                continue
            if isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                return "done", data, conn.trailing_data[0]
            else:
                assert event is h11.NEED_DATA
                return "need-data", data, b""
    except h11.RemoteProtocolError:
        return "error", data, b""


def fast_chunked(body: bytes, splits: List[int]) -> Tuple[str, bytes, bytes]:
    decoder = ChunkedDecoder()
    data = b""
    pieces = []
    last = 0
    for cut in sorted(set(splits)) + [len(body)]:
        pieces.append(body[last:cut])
        last = cut
    try:
        for piece in pieces:
            if decoder.done:
                break
            data += b"".join(decoder.feed(piece))
    except ChunkError:
        return "error", data, b""
    if decoder.done:
        return "done", data, decoder.extra
    return "need-data", data, b""


def check_chunked(body: bytes, splits: List[int]) -> None:
    oracle = h11_chunked(body)
    fast = fast_chunked(body, splits)
    if oracle[0] == "error":
        # h11 may fail before the bytes that complete a chunk arrive; the
        # decoder may not have seen the bad bytes yet either -- never "done".
        assert fast[0] in ("error", "need-data"), (body, splits, fast)
        assert oracle[1].startswith(fast[1]) or fast[1].startswith(oracle[1])
        return
    assert fast[0] == oracle[0], (body, splits, fast, oracle)
    assert fast[1] == oracle[1]


CHUNKED = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;ext=1\r\nhello\r\nA \t\r\n0123456789\r\n0\r\n\r\n",
    b"000005\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\r\nEXTRA",
    b"5\r\nhello\r\n0\r\n\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5\r\nhello\n0\r\n\r\n",
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5 ;x\r\nhello\r\n0\r\n\r\n",
    b"123456789012345678901\r\n",
    b"5\nhello\r\n0\r\n\r\n",
    b"5\r\nhel",
    b"0\r\nBad Trailer: 1\r\n\r\n",
    b"0\r\nX: a\r\n b\r\n\r\n",
]


@pytest.mark.parametrize("body", CHUNKED)
def test_chunked_corpus(body: bytes) -> None:
    for split in range(len(body) + 1):
        check_chunked(body, [split])
    check_chunked(body, list(range(len(body))))  # byte by byte


@st.composite
def chunked_bodies(draw: Any) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(min_size=1, max_size=12))
        size = draw(
            st.sampled_from([b"%x" % len(data), b"%X" % len(data), b"0%x" % len(data), b"%x" % (len(data) + 1)])
        )
        ext = draw(st.sampled_from([b"", b"", b";a=b", b" ", b"\t", b";\r", b" x"]))
        end = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n", b"\r", b"XX"]))
        parts.append(size + ext + draw(st.sampled_from([b"\r\n"] * 6 + [b"\n"])) + data + end)
    last = draw(st.sampled_from([b"0\r\n\r\n"] * 4 + [b"0\r\nX-T: 1\r\n\r\n", b"0\r\n\n", b"0\r\n", b"00\r\n\r\n"]))
    return b"".join(parts) + last + draw(st.sampled_from([b"", b"", b"HTTP/1.1 200"]))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_bodies(), st.lists(st.integers(0, 80), max_size=4))
def test_generated_chunked_bodies_match_h11(body: bytes, splits: List[int]) -> None:
    check_chunked(body, [s for s in splits if s <= len(body)])
