"""Decompress a zstd frame with a bound that holds whatever the frame says about itself.

python-zstandard's `ZstdDecompressor.decompress(data, max_output_size=n)` applies `n` only to a
frame that does not declare its content size: a frame that declares 1 GB is decompressed to
1 GB (measured: 2,579 bytes of zstd declaring 80 MiB came out as 80 MiB under a 64 MiB bound).
A consumer that takes payloads from anyone on a topic needs the bound to be one.
"""

from __future__ import annotations

import zstandard

from edge_agent.errors import EnvelopeError

_CHUNK = 1 << 20


class TooLargeError(EnvelopeError, ValueError):
    """The frame holds more than the bound allows."""


def decompress(data: bytes, limit: int) -> bytes:
    """The content of the zstd frame `data`, at most `limit` bytes of it.

    Raises TooLargeError when the frame holds more than `limit` bytes (found after reading at
    most `limit` + 1 of them, whatever it declares) and zstandard.ZstdError when it is not a
    valid frame. Bytes after the first frame are ignored, as `ZstdDecompressor.decompress` does.
    """
    declared = zstandard.frame_content_size(data)
    if declared > limit:
        raise TooLargeError(f"zstd frame declares {declared} bytes, more than {limit}")
    if declared >= 0:  # its output buffer is the declared size: a frame holding more fails
        return zstandard.ZstdDecompressor().decompress(data)
    parts: list[bytes] = []
    size = 0
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False) as reader:
        while size <= limit:
            part = reader.read(min(_CHUNK, limit + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
    if size > limit:
        raise TooLargeError(f"zstd frame holds more than {limit} bytes")
    return b"".join(parts)
