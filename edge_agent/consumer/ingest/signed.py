"""The consumer acknowledgement ingest writes (docs/contract.md §4.10), signed with its own key.

The acknowledgement is made by its codec, `edge_agent.seal.ack`; the high-water mark ingest
reads is opened by its codec too (`edge_agent.seal.hwm.open_mark`, in `decode`): ingest has no
COSE_Sign1 code of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.seal.ack import seal_ack
from edge_agent.seal.keys import key_id


class AckSigner:
    """Signs consumer acknowledgements with the consumer's own key (`seal.ack.seal_ack`)."""

    def __init__(self, key: Ed25519PrivateKey, consumer: str) -> None:
        self._key = key
        self.kid = key_id(key.public_key())
        self.consumer = consumer

    def sign(
        self,
        gateway: str,
        epoch: str,
        seqs: Sequence[tuple[int, int]],
        batches: Sequence[tuple[int, int]],
        issued_ns: int,
    ) -> bytes:
        """The COSE_Sign1 bytes of an acknowledgement of `seqs` and `batches` (inclusive
        ranges; the highest MAX_RANGES of each are sent). ValueError for names the codec
        refuses (longer than 256 characters)."""
        return seal_ack(
            self._key,
            gateway=gateway,
            epoch=epoch,
            seqs=seqs,
            batches=batches,
            issued_ns=issued_ns,
            consumer=self.consumer[:256],
        )
