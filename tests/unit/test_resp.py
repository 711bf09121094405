"""The RESP2 parser without sockets: every reply type, split at any byte."""

from __future__ import annotations

import pytest

from pyproxy.resp import RespError, RespParser, RespProtocolError, encode_command

STREAM = (
    b"+OK\r\n"
    b":42\r\n"
    b"-NOSCRIPT No matching script\r\n"
    b"$5\r\nhe\r\nl\r\n"  # a bulk string holding CRLF
    b"$-1\r\n"
    b"*3\r\n:1\r\n$3\r\nabc\r\n*2\r\n$0\r\n\r\n:-7\r\n"
    b"*0\r\n"
)


def expected() -> list:
    return [b"OK", 42, "NOSCRIPT No matching script", b"he\r\nl", None, [1, b"abc", [b"", -7]], []]


def normal(replies: list) -> list:
    return [str(r) if isinstance(r, RespError) else r for r in replies]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 11, len(STREAM)])
def test_replies_come_out_whole_however_the_bytes_are_split(step: int) -> None:
    parser = RespParser()
    out: list = []
    for i in range(0, len(STREAM), step):
        out += parser.feed(STREAM[i : i + step])
    assert normal(out) == expected()
    assert parser.feed(b"") == []


def test_bytes_that_are_not_resp_are_refused() -> None:
    with pytest.raises(RespProtocolError):
        RespParser().feed(b"HTTP/1.1 400 Bad Request\r\n")


def test_commands_are_encoded_as_bulk_arrays() -> None:
    assert (
        encode_command([b"EVALSHA", "s\u00e9", 2, 1.5])
        == b"*4\r\n$7\r\nEVALSHA\r\n$3\r\ns\xc3\xa9\r\n$1\r\n2\r\n$3\r\n1.5\r\n"
    )
