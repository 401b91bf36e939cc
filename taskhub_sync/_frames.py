"""WebSocket frames (RFC 6455, section 5), both directions. Pure: no sockets.

The libraries do the HTTP upgrade (wsproto on the hub, websocket-client in the
client); after it, both sides read and write frames with this module. The profile
that justified it (bench/micro.py): wsproto's per-frame parsing (a generator
pipeline, an event object per frame) was about half of the hub's CPU per task, and
websocket-client's receive path (several recv() calls and objects per frame) most
of a client's; this parser costs a fraction of either. It also refuses an
oversized message from its header, before reading the payload (PITFALLS LP-04/07).

Scope: no extension is negotiated, so reserved bits are errors. Frames from a
client must be masked and frames from a server must not be; control frames are at
most 125 bytes and never fragmented.
"""

from __future__ import annotations

import os
import struct
import threading

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPS = (OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

#: Fragments one message may come in (empty ones too: they would cost memory and
#: count nothing against max_message_size).
MAX_FRAGMENTS = 1024

_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


class FrameError(Exception):
    """The peer broke the framing rules; close the connection with ``code``.

    ``frames`` holds the whole frames that came before the violation in the same
    feed(): they are the peer's messages like any other.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.frames: list[tuple[int, bytes]] = []


def encode_frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    """One final frame; ``mask`` for client-to-server frames (random key each)."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = _PACK_16(0x80 | opcode, bit | 126, n)
    else:
        head = _PACK_64(0x80 | opcode, bit | 127, n)
    if not mask:
        return head + payload
    key = _mask_key()
    return head + key + unmask(payload, key)


_keys = bytearray()
_keys_lock = threading.Lock()


def _mask_key() -> bytes:
    """4 random bytes, cut from a 4 KiB batch of os.urandom (one syscall per 1,024 keys)."""
    global _keys
    with _keys_lock:
        if not _keys:
            _keys = bytearray(os.urandom(4096))
        key = bytes(_keys[-4:])
        del _keys[-4:]
    return key


def encode_close(code: int, reason: str = "", mask: bool = False) -> bytes:
    """A Close frame with ``code`` and a reason cut to fit the 125-byte limit."""
    data = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + data, mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a received Close frame; 1005 when it carries no code."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(1002, "a Close frame payload of 1 byte")
    code = struct.unpack("!H", payload[:2])[0]
    if code < 1000 or 1004 <= code <= 1006 or 1015 <= code < 3000 or code >= 5000:
        raise FrameError(1002, f"invalid close code {code}")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not UTF-8") from None


def unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``data`` with the repeating 4-byte ``mask`` (as one big-integer XOR)."""
    n = len(data)
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


class FrameReader:
    """Turns received bytes into whole messages and control frames.

    ``feed(data)`` returns a list of ``(opcode, payload)``: ``OP_TEXT``/``OP_BINARY``
    with the reassembled message, or a control opcode with its payload. Raises
    FrameError on a violation; a message over ``max_message_size`` is refused
    (1009) as soon as a frame header announces it. Not thread-safe: one reader.

    Args:
        max_message_size: Largest message accepted, in bytes.
        masked: True on the hub (client frames must be masked), False in a client
            (server frames must not be).
    """

    def __init__(self, max_message_size: int, masked: bool = True) -> None:
        self.max_message_size = max_message_size
        self._masked = masked
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._size = 0
        self._opcode: int | None = None  # opcode of the message being reassembled

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        try:
            self._parse(data, out)
        except FrameError as exc:
            exc.frames = out
            raise
        return out

    def _parse(self, data: bytes, out: list[tuple[int, bytes]]) -> None:
        buf = self._buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise FrameError(1002, "reserved bits set (no extension was negotiated)")
            if bool(b1 & 0x80) != self._masked:
                raise FrameError(1002, "client frames must be masked, server frames not")
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            self._check(opcode, bool(b0 & 0x80), n)
            if self._masked:
                total = head + 4 + n
                if end - pos < total:
                    break
                payload = unmask(
                    buf[pos + head + 4 : pos + total], buf[pos + head : pos + head + 4]
                )
            else:
                total = head + n
                if end - pos < total:
                    break
                payload = bytes(buf[pos + head : pos + total])
            pos += total
            if opcode in _CONTROL_OPS:
                out.append((opcode, payload))
                continue
            if opcode != OP_CONT:
                self._opcode = opcode
            if b0 & 0x80:
                whole = payload if not self._parts else b"".join(self._parts) + payload
                out.append((self._opcode, whole))  # type: ignore[arg-type]
                self._parts.clear()
                self._size = 0
                self._opcode = None
            else:
                if len(self._parts) >= MAX_FRAGMENTS:
                    raise FrameError(1009, f"a message in more than {MAX_FRAGMENTS} fragments")
                self._parts.append(payload)
                self._size += n
        if pos:
            del buf[:pos]

    def _check(self, opcode: int, fin: bool, n: int) -> None:
        if opcode in _CONTROL_OPS:
            if not fin or n > 125:
                raise FrameError(1002, "control frames must be final and at most 125 bytes")
        elif opcode in _DATA_OPS:
            if self._opcode is not None:
                raise FrameError(1002, "a new message began before the last one ended")
            if n > self.max_message_size:
                raise FrameError(1009, "message over max_message_size")
        elif opcode == OP_CONT:
            if self._opcode is None:
                raise FrameError(1002, "continuation frame without a message")
            if self._size + n > self.max_message_size:
                raise FrameError(1009, "message over max_message_size")
        else:
            raise FrameError(1002, f"unknown opcode {opcode}")
