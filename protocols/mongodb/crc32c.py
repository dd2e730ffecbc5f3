"""CRC-32C (Castagnoli), the checksum of an OP_MSG whose checksumPresent bit
is set (mongodb/specifications ``source/message/OP_MSG.md``, "checksum").

Polynomial 0x1EDC6F41, reflected (0x82F63B78), initial value and final XOR
0xFFFFFFFF: RFC 3720 (iSCSI), appendix B.4. No well-kept CRC-32C package is
installed here and the stdlib only has CRC-32 (another polynomial), so this
is the textbook table-driven form, a byte per step. It runs at a few MB/s:
fine for the messages drivers checksum (almost none do; the server never
asks), and the relay never computes it, only a codec that rebuilds a message.
"""

from __future__ import annotations

from typing import Final

__all__ = ["crc32c", "CHECK_VALUE"]

#: crc32c(b"123456789"), the check value every CRC catalogue lists.
CHECK_VALUE: Final = 0xE3069283


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE: Final = _table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC-32C of ``data``; pass a previous result as ``crc`` to go on
    over more bytes (``crc32c(b, crc32c(a)) == crc32c(a + b)``)."""
    table = _TABLE
    crc ^= 0xFFFFFFFF
    for byte in data if type(data) is bytes else bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
