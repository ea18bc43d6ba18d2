"""The members of an uncompressed tar held in memory, read by parsing its 512-byte headers directly.

Why not `tarfile`: a Shar field tar holds two members per cut (the encoded audio and its small JSON manifest), and
`tarfile` spends about 70 µs per member building TarInfo objects and file wrappers: 15-20% of a read task's CPU
time next to FLAC decoding (bench/README.md, mixed case). Plain ustar headers are simple to read; anything else
(PAX or GNU long-name headers, links, sparse files, compressed tars) makes `plain_tar_members` return None and the
caller falls back to `tarfile`, which handles every variant.
"""

from __future__ import annotations

BLOCK = 512
_REGULAR = (b"0", b"\0")  # typeflag of a regular file ("\0" in old tars)


class TarFormatError(ValueError):
    """The bytes are not a well-formed tar (bad checksum, truncated member)."""


def _octal(field: bytes) -> int:
    digits = field.rstrip(b"\0 ").strip()
    return int(digits, 8) if digits else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    # The checksum is computed with its own field read as eight spaces (0x20 * 8 = 256).
    return stored == sum(header[:148]) + 256 + sum(header[156:])


def plain_tar_members(raw: bytes) -> list[tuple[str, bytes]] | None:
    """[(name, data)] of every member in archive order, or None when the tar uses headers this reader leaves to
    `tarfile`. TarFormatError for a corrupt or truncated archive."""
    if raw[257:262] != b"ustar":
        return None
    members: list[tuple[str, bytes]] = []
    offset, end = 0, len(raw)
    while offset + BLOCK <= end:
        header = raw[offset : offset + BLOCK]
        if header.count(0) == BLOCK:  # end-of-archive marker
            return members
        if not _checksum_ok(header):
            raise TarFormatError(f"bad header checksum at byte {offset}")
        if header[156:157] not in _REGULAR:
            return None
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        size = _octal(header[124:136])
        start = offset + BLOCK
        if start + size > end:
            raise TarFormatError(f"member {name.decode(errors='replace')!r} is truncated")
        members.append((name.decode("utf-8"), raw[start : start + size]))
        offset = start + (size + BLOCK - 1) // BLOCK * BLOCK
    if offset != end:
        raise TarFormatError(f"the archive ends inside a header at byte {offset}")
    return members  # no end-of-archive marker: tarfile accepts that too
