"""What a data file that is not UTF-8 looks like instead, so the console can say so rather than 'no usable records'.

JSON is UTF-8 (RFC 8259 section 8.1). Editors and exports on Windows write UTF-16 with a byte-order mark, some tools
write UTF-16 without one (every other byte NUL for ASCII text), and a `.jsonl` may really be compressed: such a file
has no line that parses, so it is refused whole. A line in a legacy code page (cp1252 accents in a UTF-8 file) is one
bad record, named by charset_normalizer's best guess.
"""

from __future__ import annotations

import codecs

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32-LE"), (codecs.BOM_UTF32_BE, "UTF-32-BE"),
         (codecs.BOM_UTF16_LE, "UTF-16-LE"), (codecs.BOM_UTF16_BE, "UTF-16-BE"))  # UTF-32 first: FF FE 00 00
_MAGIC = ((b"\x1f\x8b", "gzip-compressed data"), (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
          (b"PAR1", "a parquet file"), (b"PK\x03\x04", "a zip archive"), (b"BZh", "bzip2-compressed data"))


def non_utf8_encoding(head: bytes) -> str | None:
    """The encoding (or format) the first bytes of a file show when no line of it can be UTF-8 JSON; else None."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"{name} (its byte-order mark)"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    sample = head[:4096]
    if len(sample) >= 4 and sample.count(0) * 4 >= len(sample):  # ASCII text in a 16- or 32-bit encoding
        return _nul_pattern(sample)
    return None  # UTF-8, or single-byte text whose non-UTF-8 lines are dropped one by one (guess_encoding)


def guess_encoding(data: bytes) -> str:
    """A best guess for non-UTF-8 bytes, e.g. 'cp1252' or 'latin-1'."""
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    return best.encoding if best is not None and best.encoding != "utf_8" else "binary data, not text"


def _nul_pattern(sample: bytes) -> str:
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if sample[1::4].count(0) == sample[2::4].count(0) == len(sample[1::4]) and sample[0::4].count(0) == 0:
        return "UTF-32-LE (no byte-order mark)"
    return "UTF-16-LE (no byte-order mark)" if odd > even else "UTF-16-BE (no byte-order mark)"
