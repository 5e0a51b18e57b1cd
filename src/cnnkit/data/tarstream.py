"""Reading a tar stream's files in order, the common shard case parsed directly.

A shard is read once per epoch by every data-loading worker, so its parsing is part of every sample's
cost: Python's :mod:`tarfile` spends ~0.08 ms a member building ``TarInfo`` objects; reading the 512-byte
headers here costs a fraction of that. Plain POSIX/GNU tar (ustar headers, GNU long names, PAX records
for long names, sizes and times) is parsed here; anything else (a compressed or pre-POSIX tar) goes
through :mod:`tarfile`, which reads every format.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from typing import IO, Any

_BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule: the key ends at the first dot


def samples(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The samples of a WebDataset tar, as WebDataset groups them: consecutive files sharing a key
    (the path up to the first dot of the file name) make one ``{"__key__": key, ext: bytes, ...}``;
    extensions are lower-cased, ``__meta__`` files and files without an extension are skipped."""
    sample: dict[str, Any] | None = None
    for name, data in files(stream):
        match = _KEY.match(name)
        if match is None or name.startswith("__"):
            continue
        key, ext = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        if ext in sample:
            raise ValueError(f"{name}: a second file {ext!r} for the key {key!r}")
        sample[ext] = data
    if sample is not None:
        yield sample


def files(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every regular file, in order; :class:`tarfile.ReadError` for a stream cut
    short or a damaged header."""
    head = _read(stream, _BLOCK, upto=True)
    if head[257:262] != b"ustar" and any(head):  # compressed, pre-POSIX or tiny: tarfile reads them all
        with tarfile.open(fileobj=_Rejoined(head, stream), mode="r|*") as tar:  # type: ignore[call-overload]
            for member in tar:
                f = tar.extractfile(member) if member.isreg() else None
                if f is not None:
                    yield member.name, f.read()
        return
    long_name: str | None = None
    pax: dict[str, str] = {}
    while any(head):  # a zero block (or the end of the stream) ends the archive
        if len(head) != _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        checksum = _number(head[148:156])  # the sum of the header's bytes, its own field taken as spaces
        if checksum != sum(head[:148]) + 256 + sum(head[156:]) and checksum != _signed_sum(head):
            raise tarfile.ReadError("bad checksum in a tar header")
        size = int(pax["size"]) if "size" in pax else _number(head[124:136])
        kind = head[156:157]
        data = _read(stream, size)
        _read(stream, -size % _BLOCK)
        if kind == b"L":  # GNU: the long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # PAX: records (long name, size) of the next member
            pax = _pax(data)
        else:
            if kind in (b"0", b"\0", b"7"):  # a regular file (directories, links... are skipped)
                yield pax.get("path") or long_name or _name(head), data
            long_name, pax = None, {}
        head = _read(stream, _BLOCK, upto=True)


def _read(stream: IO[bytes], n: int, upto: bool = False) -> bytes:
    """``n`` bytes (pipes and sockets may return fewer a call); ``upto``: fewer at the end of the stream."""
    data = stream.read(n) if n else b""
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            if upto:
                return data
            raise tarfile.ReadError("unexpected end of data")
        data += more
    return data


def _signed_sum(head: bytes) -> int:
    """The checksum some old tars write: bytes taken as signed."""
    signed = [b - 256 if b >= 128 else b for b in head]
    return sum(signed[:148]) + 256 + sum(signed[156:])


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (sizes of 8 GiB and more)
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else value - (1 << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"a damaged number field in a tar header ({text!r})") from None


def _name(head: bytes) -> str:
    name = head[:100].split(b"\0", 1)[0]
    prefix = head[345:500].split(b"\0", 1)[0] if head[257:263] == b"ustar\0" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """PAX extended-header records (``"LEN key=value\\n"``)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _Rejoined(io.RawIOBase):
    """A stream whose first bytes were already read: those, then the rest."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            data = self.head if n < 0 else self.head[:n]
            self.head = self.head[len(data) :]
            return data
        return self.rest.read(n)
