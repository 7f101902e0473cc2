"""`pipelines.tar_members`: the same members as `tarfile` for every format Python writes, and
damage raised, never a quiet short read."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipelines.tar_members import TarDamage, tar_members

MEMBERS = [
    ("s/k000.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    ("s/k000.txt", "une légende".encode()),
    ("s/k000.json", b"{}"),
    ("s/empty.txt", b""),
    ("s/" + "d" * 120 + "/k001.txt", b"long path"),  # > 100 bytes: prefix, GNU L or pax path
    ("s/k002.txt", b"x" * 512),  # exactly one block: no padding
    ("s/k003.txt", "é".encode() * 700),
]


def write_tar(fmt: int, mode: str = "w", extras: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        if extras:
            tar.addfile(tarfile.TarInfo("s/dir"), None)  # a regular-looking entry first...
            d = tarfile.TarInfo("s/subdir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("s/link.txt")
            link.type, link.linkname = tarfile.SYMTYPE, "s/k000.txt"
            tar.addfile(link)
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read(data: bytes) -> list[tuple[str, bytes]]:
    return list(tar_members(io.BytesIO(data)))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_same_members_as_tarfile(fmt, mode):
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits the long path into prefix + name
        assert len(MEMBERS[4][0]) < 255
    data = write_tar(fmt, mode)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    got = read(data)
    assert got == expected
    assert [n for n, _ in got] == ["s/dir"] + [n for n, _ in MEMBERS]  # dir and symlink skipped


def test_pax_size_and_base256_numbers():
    big_uid = tarfile.TarInfo("s/uid.txt")  # uid beyond octal range: GNU writes base-256
    big_uid.uid, big_uid.size = 8**8 + 5, 3
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(big_uid, io.BytesIO(b"abc"))
    assert read(buf.getvalue()) == [("s/uid.txt", b"abc")]


def test_damage_raises_after_the_members_before_it():
    data = write_tar(tarfile.USTAR_FORMAT, extras=False)
    names = [n for n, _ in MEMBERS]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    # A flipped byte in the third header: two members, then damage.
    bad = bytearray(data)
    bad[offsets[2] + 3] ^= 0x40
    got: list[str] = []
    with pytest.raises(TarDamage, match="checksum"):
        for name, _ in tar_members(io.BytesIO(bytes(bad))):
            got.append(name)
    assert got == names[:2]
    # Every cut before the end-of-archive block is damage, never a quiet short read.
    end = len(data.rstrip(b"\x00"))
    end = -(-end // 512) * 512
    for cut in list(range(1, end, 97)) + [end]:
        with pytest.raises(TarDamage):
            read(data[:cut])
    assert [n for n, _ in read(data[: end + 512])] == names  # one zero block is a clean end
    with pytest.raises(TarDamage, match="empty"):
        read(b"")
    with pytest.raises(TarDamage, match="not a tar"):
        read(b"\x00\x01not a tar at all" * 40)
    gz = write_tar(tarfile.USTAR_FORMAT, "w:gz")
    with pytest.raises(EOFError):  # a cut-off compressed tar: the decompressor's own error
        read(gz[: len(gz) // 2])
