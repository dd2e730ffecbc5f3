"""The one ssh-agent request Wicket makes: add a key and its certificate
for a while (draft-miller-ssh-agent, "Adding keys to the agent" and
"Key constraints"; OpenSSH's PROTOCOL.agent).

``wicket proxy ssh --stdio`` without ``--fdpass`` cannot hand ssh its
connection's certificate through a file (ssh reads certificate files before
its ProxyCommand has the dial's answer); it gives the agent of
``$SSH_AUTH_SOCK`` the connection's in-memory key and certificate instead,
with a lifetime as long as the certificate's, and ssh asks the agent when it
authenticates, which is after the ProxyCommand has relayed the node's key
exchange.

Each message is ``length:u32be type:u8 contents``. The request is
SSH_AGENTC_ADD_ID_CONSTRAINED (25) with an Ed25519 certificate key
(``ssh-ed25519-cert-v01@openssh.com``: the certificate blob, the 32-byte
public key, the 64-byte private key as seed || public, a comment) and the
lifetime constraint (1, seconds as u32); the reply is SSH_AGENT_SUCCESS (6)
or SSH_AGENT_FAILURE (5).
"""

from __future__ import annotations

import struct
from typing import Final

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import FrameLayout, FrameSplitter
from protocols.signals import NEED_DATA

SSH_AGENTC_ADD_ID_CONSTRAINED: Final = 25
SSH_AGENT_CONSTRAIN_LIFETIME: Final = 1
SSH_AGENT_FAILURE: Final = 5
SSH_AGENT_SUCCESS: Final = 6
ED25519_CERT: Final = b"ssh-ed25519-cert-v01@openssh.com"
#: An agent's answer to an add is one byte; anything past this is not one.
MAX_REPLY: Final = 1024

AGENT_FRAME: Final = FrameLayout(name="ssh-agent reply", header=">I", length_field=0, uncounted=4,
                                 min_length=1, max_length=MAX_REPLY)


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def add_ed25519_certificate(*, certificate: bytes, public: bytes, seed: bytes, comment: str,
                            lifetime: int) -> bytes:
    """The request that adds an Ed25519 key (``seed``, ``public``: 32
    bytes each) with its ``certificate`` (the wire blob) for ``lifetime``
    seconds."""
    if len(public) != 32 or len(seed) != 32:
        raise LocalProtocolError("an Ed25519 key is a 32-byte seed and a 32-byte public key")
    if not 0 < lifetime < 1 << 32:
        raise LocalProtocolError(f"lifetime {lifetime} is not 1..2^32-1 seconds")
    body = (bytes([SSH_AGENTC_ADD_ID_CONSTRAINED]) + _string(ED25519_CERT) + _string(certificate)
            + _string(public) + _string(seed + public) + _string(comment.encode())
            + bytes([SSH_AGENT_CONSTRAIN_LIFETIME]) + struct.pack(">I", lifetime))
    return _string(body)


class ReplyReader:
    """The agent's one reply: :meth:`next_event` is True (added), False
    (refused) or ``NEED_DATA``."""

    def __init__(self) -> None:
        self._buffer = ReceiveBuffer(MAX_REPLY + 4)
        self._splitter = FrameSplitter(AGENT_FRAME)

    def receive_data(self, data: bytes) -> None:
        if not data:
            raise RemoteProtocolError("the ssh-agent closed the connection before it answered",
                                      code=ErrorCode.BAD_REQUEST)
        self._buffer.feed(data)

    def next_event(self) -> bool | object:
        frame = self._splitter.read_frame(self._buffer)
        if frame is None:
            return NEED_DATA
        kind = frame.body[0]
        if kind not in (SSH_AGENT_SUCCESS, SSH_AGENT_FAILURE):
            raise RemoteProtocolError(f"the ssh-agent answered with message {kind}, not success or failure",
                                      code=ErrorCode.BAD_REQUEST)
        return kind == SSH_AGENT_SUCCESS
