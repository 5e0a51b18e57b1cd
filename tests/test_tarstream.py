"""The shard reader's own tar parser against Python's tarfile, on every tar format and on damage."""

from __future__ import annotations

import io
import tarfile

import pytest

from cnnkit.data import tarstream

NAMES = ["a.jpg", "a.json", "dir/b.png", "x" * 150 + "/k.cls", "y" * 120 + ".txt", "ünï.JPG"] + [
    f"s{i}.jpg" for i in range(30)
]


def make_tar(fmt: int, compress: str = "") -> bytes:
    buf = io.BytesIO()
    names = [n for n in NAMES if fmt != tarfile.USTAR_FORMAT or len(n.rsplit("/", 1)[-1]) < 100]
    with tarfile.open(fileobj=buf, mode=f"w:{compress}" if compress else "w", format=fmt) as tar:
        for i, name in enumerate(names):
            data = bytes([i % 256]) * (i * 37 % 2000)  # sizes off and on the 512-byte blocks
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5 if fmt == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return buf.getvalue()


def reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", ["", "gz"])
def test_every_tar_format_reads_as_tarfile_reads_it(fmt: int, compress: str) -> None:
    data = make_tar(fmt, compress)
    got = list(tarstream.files(io.BytesIO(data)))
    assert got == reference(data) and len(got) > 30
    samples = list(tarstream.samples(io.BytesIO(data)))
    first = samples[0]
    assert first["__key__"] == "a" and set(first) == {"__key__", "jpg", "json"}
    assert any(s["__key__"] == "ünï" and "jpg" in s for s in samples)  # extensions lower-cased


class Trickle(io.RawIOBase):
    """A pipe that returns at most 100 bytes a read."""

    def __init__(self, data: bytes) -> None:
        self.data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.data.read(min(n, 100) if n >= 0 else 100)


def test_short_reads_cuts_and_damage() -> None:
    data = make_tar(tarfile.GNU_FORMAT)
    assert list(tarstream.files(Trickle(data))) == reference(data)  # type: ignore[arg-type]
    assert list(tarstream.files(io.BytesIO(b""))) == []
    for cut in (513, 1500, len(data) // 2):  # inside a member, inside a header
        with pytest.raises(tarfile.ReadError):
            list(tarstream.files(io.BytesIO(data[:cut])))
    damaged = bytearray(data)
    damaged[5] ^= 0xFF  # a byte of the first header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tarstream.files(io.BytesIO(bytes(damaged))))
    twice = tarfile.TarInfo("k.jpg")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(twice, io.BytesIO())
        tar.addfile(twice, io.BytesIO())
    with pytest.raises(ValueError, match="second file"):
        list(tarstream.samples(io.BytesIO(buf.getvalue())))
