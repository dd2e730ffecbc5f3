"""gateway.net.ends: the text a failed write ends a session with, made in
one place for every writer (endio, pairs, the multiplexed link and its
streams)."""

from __future__ import annotations

import errno
import socket

from gateway.net.ends import End, Failure, send_failure


def test_a_refused_write_marks_the_end_and_says_which_and_why():
    a, b = socket.socketpair()
    try:
        end = End(a, "client", None, None)
        failure = send_failure(end, BrokenPipeError(errno.EPIPE, "Broken pipe"))
        assert isinstance(failure, Failure) and str(failure) == "client: send failed: Broken pipe"
        assert end.failed and end.os_error == errno.EPIPE
        eof = send_failure(End(b, "upstream", None, None), OSError(errno.ENOTCONN, "Transport endpoint is not "
                                                                                    "connected"), "send_eof")
        assert str(eof) == "upstream: send_eof failed: Transport endpoint is not connected"
    finally:
        a.close()
        b.close()
