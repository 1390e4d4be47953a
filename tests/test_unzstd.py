"""The decompression bound holds whatever a zstd frame declares (seal/unzstd.py).

python-zstandard's own `max_output_size` is applied only to frames that do not declare their
size: 2,579 bytes declaring 80 MiB came out as 80 MiB under a 64 MiB bound. Both consumers'
inputs go through the bound: a batch's payload (after its signature) and a point catalogue
(anyone who can publish on its topic).
"""

from __future__ import annotations

import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import EnvelopeError
from edge_agent.seal import unzstd
from edge_agent.seal.envelope import MAX_PAYLOAD_BYTES, Opener, Signer

pytestmark = pytest.mark.unit

DECLARED = zstandard.ZstdCompressor()
UNDECLARED = zstandard.ZstdCompressor(write_content_size=False)


@pytest.mark.parametrize("compressor", [DECLARED, UNDECLARED], ids=["declared", "undeclared"])
def test_a_frame_over_the_bound_is_refused_and_one_at_it_is_read(
    compressor: zstandard.ZstdCompressor,
) -> None:
    limit = 1 << 20
    assert unzstd.decompress(compressor.compress(b"ab" * (limit // 2)), limit) == b"ab" * (
        limit // 2
    )
    with pytest.raises(unzstd.TooLargeError, match=f"more than {limit}"):
        unzstd.decompress(compressor.compress(bytes(limit + 1)), limit)


def test_a_frame_that_is_not_zstd_is_a_zstd_error() -> None:
    with pytest.raises(zstandard.ZstdError):
        unzstd.decompress(b"not zstd at all", 1 << 20)


def test_a_signed_batch_that_inflates_beyond_64_mib_is_refused() -> None:
    """A trusted key's payload of 2.6 kB that declares 80 MiB: refused before it is made."""
    key = Ed25519PrivateKey.generate()
    bomb = DECLARED.compress(bytes(MAX_PAYLOAD_BYTES + (16 << 20)))
    assert len(bomb) < 4096
    message = Signer(key).sign(bomb, encoding="zstd")
    with pytest.raises(EnvelopeError, match="bad zstd payload: zstd frame declares"):
        Opener([key.public_key()]).open(message)
