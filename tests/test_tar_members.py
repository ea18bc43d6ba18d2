"""The direct tar reader gives what lhotse's tarfile reader gives for Shar tars, and refuses or defers the rest."""

from __future__ import annotations

import io
import tarfile

import pytest

from orchestrator.data.shar import _iter_tar_entries_with_tarfile, iter_tar_entries
from orchestrator.data.tar_members import TarFormatError, plain_tar_members


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shar_like() -> bytes:
    # Data then manifest per cut, as lhotse's TarWriter writes them; the second cut has no audio (placeholders);
    # sizes of 0, 511, 512 and 513 bytes cross the block padding rule.
    return _tar(
        [
            ("cut-a.flac", b"\x01" * 511),
            ("cut-a.json", b'{"id": "cut-a"}'),
            ("cut-b.nodata", b""),
            ("cut-b.nometa", b""),
            ("dir/cut-c.flac", b"\x02" * 513),
            ("dir/cut-c.json", b"{}" * 256),
        ]
    )


def test_shar_tar_reads_the_same_as_with_tarfile():
    raw = _shar_like()
    direct = list(iter_tar_entries(raw))
    assert direct == list(_iter_tar_entries_with_tarfile(raw))
    assert [e.cut_id for e in direct] == ["cut-a", "cut-b", "dir/cut-c"]
    assert direct[1].data is None and direct[1].manifest is None
    assert direct[2].data == b"\x02" * 513


def test_long_names_and_compressed_tars_fall_back_to_tarfile():
    long_name = "x" * 150 + ".flac"
    pax = _tar([(long_name, b"audio"), ("x" * 150 + ".json", b"{}")], fmt=tarfile.PAX_FORMAT)
    assert plain_tar_members(pax) is None
    assert [e.cut_id for e in iter_tar_entries(pax)] == ["x" * 150]
    assert plain_tar_members(b"\x1f\x8b" + b"\0" * 1022) is None  # gzip magic, not ustar


def test_corrupt_header_and_truncated_member_are_errors():
    raw = bytearray(_shar_like())
    raw[5] ^= 0xFF  # a byte of the first member's name: the header checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum"):
        plain_tar_members(bytes(raw))
    with pytest.raises(TarFormatError, match="truncated"):
        plain_tar_members(_shar_like()[:700])  # cut inside the first member's data


def test_an_odd_member_count_is_not_a_shar_tar():
    with pytest.raises(TarFormatError, match="pairs"):
        list(iter_tar_entries(_tar([("cut-a.flac", b"1"), ("cut-a.json", b"{}"), ("cut-b.flac", b"2")])))
