"""The socketpair between the main process and an acceptor: frame format and the messages on it.

Frames are an 8-byte header (metadata length, data length), then the metadata as one JSON
object, then the data bytes (a piece of a body, sent without re-encoding). JSON, not pickle:
acceptors face the internet, and a frame from one that was taken over must not be able to run
code in the main process, which holds the spool and every upstream secret. Each kind of frame
is encoded and decoded explicitly here; anything else is a :class:`FrameError`.

The config an acceptor gets (:func:`acceptor_config_data`) carries no upstream secret: the
accounts' ``api_key`` and the admin token are withheld. It keeps the users' password hashes
(AUTH runs in the acceptor) and the DKIM keys (signing runs in the acceptor's Preparer; see
docs/decisions.md, "Operations").
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct

from pydantic import ValidationError

from relay.config import Config
from relay.config.schema import SECRETS_WITHHELD
from relay.errors import SMTPReply
from relay.policy.anvil import LimitsUnavailable
from relay.spool import (
    NewMessage,
    piece_chunks,
)

FRAME_HEADER = struct.Struct("!II")  # metadata length, data length
PIECE_SIZE = 256 * 1024  # the most of a body one frame carries
MAX_METADATA = 16 * 1024 * 1024  # a config with many users and keys stays far below this


class FrameError(ValueError):
    """A frame that is not one of ours: the connection it came on is closed."""


@dataclasses.dataclass(frozen=True)
class Ready:
    """Acceptor → main, its first frame: its listeners are serving."""


READY = Ready()


@dataclasses.dataclass(frozen=True)
class BodyPiece:
    """Acceptor → main: the frame's data is the next piece of the body of message ``sequence``."""

    sequence: int


@dataclasses.dataclass(frozen=True)
class MessageFrame:
    """Acceptor → main: message ``sequence``, without its body (its pieces came before)."""

    sequence: int
    message: NewMessage


@dataclasses.dataclass(frozen=True)
class Stored:
    """Main → acceptor: message ``sequence`` is on disk (``error`` None) or was refused."""

    sequence: int
    error: str | None


@dataclasses.dataclass(frozen=True)
class LimitsCall:
    """Acceptor → main: a :class:`relay.policy.anvil.SharedLimits` method; ``sequence`` None: no answer wanted."""

    sequence: int | None
    method: str
    args: tuple


@dataclasses.dataclass(frozen=True)
class LimitsAnswer:
    """Main → acceptor: what the method returned (a LimitsUnavailable: what it raised)."""

    sequence: int
    value: object


ASKED_METHODS = frozenset({"admit", "admit_address", "auth_locked_for", "auth_failed"})
TOLD_METHODS = frozenset({"release", "auth_succeeded"})
PER_CONNECTION_METHODS = frozenset({"admit", "admit_address", "release"})  # first argument: a connection key

_MESSAGE_FIELDS = {field.name: field for field in dataclasses.fields(NewMessage) if field.name != "body"}


# -- the config an acceptor runs ----------------------------------------------------------------


def acceptor_config_data(config: Config) -> dict:
    """The config as JSON data, without the upstream secrets an acceptor never needs."""
    data = config.model_dump(mode="json")  # SecretStr dumps as "**********": the kept ones are put back
    for account in data["accounts"].values():
        account["api_key"] = None
    data["admin"]["token"] = None
    for domain, key in config.dkim.items():
        data["dkim"][domain]["key"] = key.key.get_secret_value()
    if config.spool.dsn is not None:  # its rate budgets and suppression list are read from the database
        data["spool"]["dsn"] = config.spool.dsn.get_secret_value()
    return data


def acceptor_config(data: object) -> Config:
    """The config :func:`acceptor_config_data` sent, validated as any config is."""
    try:
        return Config.model_validate(data, context={SECRETS_WITHHELD: True})
    except ValidationError as error:
        raise FrameError(f"config frame: {error.error_count()} invalid value(s)") from None


# -- encoding ----------------------------------------------------------------------------------


def encode(meta: object) -> bytes:
    """One frame's metadata as JSON (ASCII: lone surrogates from 8-bit addresses survive)."""
    return json.dumps(_as_data(meta), separators=(",", ":")).encode()


def _as_data(meta: object) -> dict:
    match meta:
        case Ready():
            return {"kind": "ready"}
        case BodyPiece(sequence):
            return {"kind": "piece", "sequence": sequence}
        case MessageFrame(sequence, message):
            return {"kind": "message", "sequence": sequence,
                    "message": {name: getattr(message, name) for name in _MESSAGE_FIELDS}}
        case Stored(sequence, error):
            return {"kind": "stored", "sequence": sequence, "error": error}
        case LimitsCall(sequence, method, args):
            return {"kind": "limits_call", "sequence": sequence, "method": method, "args": list(args)}
        case LimitsAnswer(sequence, value):
            return {"kind": "limits_answer", "sequence": sequence, "answer": _answer_data(value)}
        case Config():
            return {"kind": "config", "config": acceptor_config_data(meta)}
    raise TypeError(f"not a frame: {type(meta).__name__}")


def _answer_data(value: object) -> dict:
    if isinstance(value, SMTPReply):
        return {"reply": [value.code, value.enhanced, value.text]}
    if isinstance(value, LimitsUnavailable):
        return {"unavailable": str(value)}
    if value is None or isinstance(value, (int, float)):
        return {"value": value}
    raise TypeError(f"not a limits answer: {type(value).__name__}")


# -- decoding ----------------------------------------------------------------------------------


def decode(encoded: bytes) -> object:
    """The frame :func:`encode` made; :class:`FrameError` for anything else (a pickle included)."""
    try:
        data = json.loads(encoded)
    except (UnicodeDecodeError, ValueError):
        raise FrameError("metadata is not JSON") from None
    if not isinstance(data, dict):
        raise FrameError("metadata is not a JSON object")
    try:
        return _from_data(data)
    except (KeyError, TypeError) as error:
        raise FrameError(f"malformed {data.get('kind')!r} frame: {error!r}") from None


def _from_data(data: dict) -> object:
    kind = data["kind"]
    if kind == "ready":
        return READY
    if kind == "piece":
        return BodyPiece(_int(data["sequence"]))
    if kind == "message":
        return MessageFrame(_int(data["sequence"]), _message(data["message"]))
    if kind == "stored":
        return Stored(_int(data["sequence"]), _optional(data["error"], str))
    if kind == "limits_call":
        sequence = None if data["sequence"] is None else _int(data["sequence"])
        args = data["args"]
        if not isinstance(args, list) or not all(arg is None or isinstance(arg, (str, int)) for arg in args):
            raise TypeError("args")
        return LimitsCall(sequence, _typed(data["method"], str), tuple(args))
    if kind == "limits_answer":
        return LimitsAnswer(_int(data["sequence"]), _answer(data["answer"]))
    if kind == "config":
        return acceptor_config(data["config"])
    raise FrameError(f"unknown frame kind {kind!r}")


def _message(data: object) -> NewMessage:
    if not isinstance(data, dict) or set(data) != set(_MESSAGE_FIELDS):
        raise TypeError("message fields")
    for name in ("id", "user", "listener", "client", "account", "channel", "sender"):
        _typed(data[name], str)
    _typed(data["received_at"], (int, float))
    if not isinstance(data["recipients"], list) or not all(isinstance(r, str) for r in data["recipients"]):
        raise TypeError("recipients")
    _optional(data["label"], int)
    _optional(data["mail_from"], str)
    return NewMessage(**data, body=())


def _answer(data: dict) -> object:
    if "reply" in data:
        code, enhanced, text = data["reply"]
        return SMTPReply(_optional(code, int), _optional(enhanced, str), _typed(text, str))
    if "unavailable" in data:
        return LimitsUnavailable(_typed(data["unavailable"], str))
    value = data["value"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError("value")
    return value


def _typed(value, kind):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not {kind}")
    return value


def _int(value) -> int:
    return _typed(value, int)


def _optional(value, kind):
    return None if value is None else _typed(value, kind)


# -- frames ------------------------------------------------------------------------------------


# Frames smaller than this are joined into one write: copying a few KB costs less than the
# system call of a write per frame (each piece of a 5 KB message was two, the message one more).
JOINED_WRITE = 64 * 1024


def frame_head(meta: object, data_length: int = 0) -> bytes:
    """A frame's header and metadata; its ``data_length`` bytes of data follow."""
    encoded = encode(meta)
    return FRAME_HEADER.pack(len(encoded), data_length) + encoded


def write_frame(writer: asyncio.StreamWriter, meta: object, data: bytes | memoryview = b"") -> None:
    """One whole frame, written at once (never interleaved with another); ``data`` at most a piece."""
    head = frame_head(meta, len(data))
    if len(data) < JOINED_WRITE:
        writer.write(head + data if data else head)
    else:
        writer.write(head)
        writer.write(data)


def _frame(meta: object, pieces: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A frame whose data is ``pieces`` one after the other (at most a piece in all), as buffers to write."""
    return [frame_head(meta, sum(len(piece) for piece in pieces)), *pieces]


async def write_message(writer: asyncio.StreamWriter, sequence: int, message: NewMessage) -> None:
    """A message's body as piece frames, draining after each, then the message without its body.

    A body that fits in one piece (most mail) goes as one piece frame, joined by the kernel from
    its pieces (the new header, the body as received), in the same write as the message frame:
    one ``send()`` for the acceptor and one read for the main process, where there was a pair of
    writes per piece and one for the message.
    """
    pieces = message.pieces
    if message.size <= PIECE_SIZE and all(isinstance(piece, (bytes, bytearray, memoryview)) for piece in pieces):
        body = _frame(BodyPiece(sequence), [piece for piece in pieces if len(piece)]) if message.size else []
        writer.writelines([*body, *_frame(MessageFrame(sequence, message), [])])
        await writer.drain()
        return
    for piece in pieces:
        for chunk in piece_chunks(piece, PIECE_SIZE):
            write_frame(writer, BodyPiece(sequence), chunk)
            await writer.drain()
    write_frame(writer, MessageFrame(sequence, message))


def check_lengths(meta_length: int, data_length: int) -> None:
    """Refuse a header that announces more than any frame of ours carries."""
    if meta_length > MAX_METADATA or data_length > PIECE_SIZE:
        raise FrameError(f"frame too large ({meta_length} + {data_length} bytes)")


async def read_frame(reader: asyncio.StreamReader) -> tuple[object, bytes]:
    """The next frame; ``asyncio.IncompleteReadError`` when the other side is gone, FrameError if not ours."""
    meta_length, data_length = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    check_lengths(meta_length, data_length)
    meta = decode(await reader.readexactly(meta_length))
    data = await reader.readexactly(data_length) if data_length else b""
    return meta, data
