"""MongoDB's wire protocol, sans-I/O: bytes in, events out, bytes to send.

``bson`` (the value format), ``wire`` (messages and a message reader),
``commands`` (what a command touches; error replies), ``handshake`` (the
gateway's hello), ``audit`` (the
cluster's streaming auditors), ``scram`` (the cluster's upstream login),
``crc32c`` (OP_MSG checksums). The names
below are the ones the gateway and the cluster use.
"""

from protocols.mongodb.audit import (
    ClientAuditor, CommandEvent, ErrorReplyEvent, ServerAuditor, UnauditedMessageEvent,
)
from protocols.mongodb.bson import decode as decode_bson
from protocols.mongodb.bson import encode as encode_bson
from protocols.mongodb.commands import (
    ERROR_CODES, Command, Namespace, error_code_for, error_document, error_reply, reply_to,
    view, view_message,
)
from protocols.mongodb.handshake import (
    DEFAULT_HELLO, HELLO_PROBE, ClientHello, HandshakeReader, SessionBegins, client_hello, command_of,
    compressors_of, gateway_hello, hello_from_params, hello_params, max_message_size,
)
from protocols.mongodb.scram import LocalLogin, ScramLogin, ScramLoginError, password_digest
from protocols.mongodb.wire import (
    DEFAULT_MAX_MESSAGE_SIZE, SUPPORTED_COMPRESSORS, Compressor, DocumentSequence, Message,
    MessageReader, OpCompressed, OpMsg, OpQuery, OpReply, UnsupportedCompressor, compress,
    decode_message, decompress,
)

__all__ = [
    "DEFAULT_HELLO", "DEFAULT_MAX_MESSAGE_SIZE", "HELLO_PROBE", "ERROR_CODES", "SUPPORTED_COMPRESSORS",
    "ClientAuditor", "ClientHello", "HandshakeReader", "LocalLogin", "SessionBegins", "Command", "CommandEvent", "Compressor", "DocumentSequence",
    "ErrorReplyEvent", "Message", "MessageReader", "Namespace", "OpCompressed", "OpMsg",
    "OpQuery", "OpReply", "ScramLogin", "ScramLoginError", "ServerAuditor",
    "UnauditedMessageEvent", "UnsupportedCompressor",
    "compress", "decode_bson", "decode_message", "decompress", "encode_bson", "error_code_for",
    "error_document", "error_reply", "client_hello", "command_of", "compressors_of", "gateway_hello", "hello_from_params", "hello_params", "max_message_size", "password_digest",
    "reply_to", "view", "view_message",
]
