"""`edge-agent verify`: the cloud-side reference consumer.

Subscribes with a persistent session, verifies every batch against the trusted public keys (by
key id), drops duplicates by `seq`, and at the end reports holes that no eviction explains.
Exit status: 0 all verified and complete, 3 a bad signature or unknown key, 4 an unexplained gap.
With `--ack-key` (and `--state`) it also acknowledges what it durably holds, signed with the
consumer's key, for agents in `mqtt.ack: end_to_end` mode (consumer/acks.py, contract §4.10).
Readings lost with an epoch that the gateway declared ended (`previous_epoch`: its buffer was
quarantined, went missing or was replaced) are reported as LOST with the reason; declared, they
are not an unexplained gap, like declared evictions.

Signed high-water marks (`/hwm` topics, seal/hwm.py) are verified like batches (a refused one
is REJECTED, exit 3) and say how far each epoch was sealed: the tail not received yet is
reported PENDING (exit 0) while the epoch is alive, and is a hole (exit 4) once a later epoch of
the gateway began without declaring this one ended. A seq received again in another batch or
with other readings is a CONFLICT (exit 3), counted apart from duplicates. Batch-number gaps
are reported (BATCHES), not judged: an evicted batch's number never arrives.

Point catalogues (`/catalogue/{digest}` topics, §4.12) fill the Opener's book
(consumer/catalogues.py); a batch whose catalogue has not come yet is parked in memory and
verified when it comes. One still waiting at the end is reported (PENDING CATALOGUE) and its
readings are not verified: the stream is incomplete (exit 4).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.consumer.acks import AckPublisher, save_state
from edge_agent.consumer.catalogues import CatalogueBook, is_catalogue_topic
from edge_agent.consumer.clock_report import ClockTally
from edge_agent.consumer.completeness import Completeness, Stream
from edge_agent.errors import EnvelopeError
from edge_agent.reading import RejectedValue, checked
from edge_agent.seal.catalogue import CatalogueMissingError
from edge_agent.seal.envelope import Batch, Opener
from edge_agent.seal.hwm import TOPIC_SUFFIX, HighWaterMark, open_mark
from edge_agent.seal.keys import load_private_key, load_public_key
from edge_agent.seal.trust import TrustSet
from edge_agent.secret_file import read_secret_file

log = logging.getLogger(__name__)

EXIT_BAD_ARGUMENTS = 2
EXIT_BAD_SIGNATURE = 3
EXIT_GAP = 4
SESSION_EXPIRY_S = 7 * 86400
DRAIN_S = 0.3
"""After a stop: how long to wait for a message the receiving task may already have taken from
the queue (cancelling it then could drop it); never a wait for the stream to go quiet."""


@dataclass
class VerifyResult:
    """Running totals, for the summary line and the demo's live view."""

    batches: int = 0
    readings: int = 0
    duplicates: int = 0
    rejected: int = 0
    last_error: str | None = None
    nonconforming: int = 0
    """Readings whose value broke the value rules of §4 (NaN, infinity...): shown as bad."""
    first_nonconforming: str | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    marks: int = 0
    """High-water marks verified."""
    rejected_marks: int = 0
    """Of `rejected`, how many were high-water marks."""
    rejected_catalogues: int = 0
    """Of `rejected`, how many were catalogue messages (§4.12)."""


class Checked(NamedTuple):
    """What one received batch came to: `batch` None when it was refused (see
    `VerifyResult.last_error`), else the batch and its readings not seen before."""

    topic: str
    batch: Batch | None
    fresh: list[dict[str, Any]]


class Verifier:
    """Checks messages one at a time; no I/O, so tests and the demo can drive it directly."""

    def __init__(
        self, opener: Opener, tracker: Completeness | None = None, trust: TrustSet | None = None
    ) -> None:
        self.opener = opener
        self.tracker = tracker or Completeness()
        self.trust = trust
        """Validity and retirement of the keys (seal/trust.py); None: every key the opener has."""
        self.result = VerifyResult()
        self.clock = ClockTally()
        """What the batches said of their gateway's clock (`clock`, contract §4.3)."""
        self.book = CatalogueBook(opener.catalogues)
        """The catalogues received (the Opener decodes with them) and the batches parked."""

    def receive(self, topic: str, payload: bytes) -> list[Checked]:
        """Handle a message of a batch topic or of a catalogue topic (`.../catalogue/{hex}`).

        A batch gives its outcome, or nothing while it is parked waiting for its catalogue. A
        catalogue gives the outcomes of the batches it released, in their arrival order, or,
        refused (counted in `rejected`), one outcome with `batch` None.
        """
        if is_catalogue_topic(topic):
            return self.check_catalogue(topic, payload)
        checked = self._check(topic, payload)
        return [] if checked is None else [checked]

    def check(self, payload: bytes, topic: str = "") -> tuple[Batch | None, list[dict[str, Any]]]:
        """Verify one batch message; return it and its readings not seen before.

        A batch is refused (counted in `rejected`) when the envelope does not verify, or when
        the trust set says its key is retired or was not valid when the batch was sealed. A
        batch whose catalogue has not arrived is parked (also `None, []`; `receive` tells the
        two apart) and verified when the catalogue comes (`check_catalogue`).
        """
        checked = self._check(topic, payload)
        return (None, []) if checked is None else (checked.batch, checked.fresh)

    def check_catalogue(self, topic: str, payload: bytes) -> list[Checked]:
        """Take one catalogue message into the book; verify the batches it releases.

        A refused catalogue (not CBOR, not a catalogue, a digest other than its topic's, over
        the bounds) is counted in `rejected` like a batch and returned as one refused outcome.
        """
        try:
            released = self.book.add(topic, payload)
        except EnvelopeError as exc:
            self.result.rejected += 1
            self.result.rejected_catalogues += 1
            self.result.last_error = str(exc)
            return [Checked(topic, None, [])]
        outcomes = (self._check(parked.topic, parked.payload) for parked in released)
        return [checked for checked in outcomes if checked is not None]

    def _check(self, topic: str, payload: bytes) -> Checked | None:
        """`check`'s work; None when the batch is parked."""
        try:
            batch = self.opener.open(payload)
            if self.trust is not None:
                self.trust.check(batch.kid, batch.sealed_ns)
        except CatalogueMissingError as exc:  # authentic, not decodable yet
            try:
                self.book.park(topic, payload, exc.digest)
            except EnvelopeError as full:
                return self._refused(topic, str(full))
            return None
        except EnvelopeError as exc:
            return self._refused(topic, str(exc))
        try:
            fresh = self.tracker.accept(
                batch.gateway,
                batch.epoch,
                batch.readings,
                batch.evicted,
                batch.evicted_reasons,
                batch=batch.batch,
                sealed_ns=batch.sealed_ns,
                digest=batch.digest,
            )
            if batch.previous_epoch is not None:
                ended = batch.previous_epoch
                self.tracker.end_epoch(
                    batch.gateway, ended.epoch, ended.last_seq, f"{ended.ended}: {ended.detail}"
                )
        except (KeyError, TypeError, ValueError) as exc:  # signed, but not what §4 says
            return self._refused(topic, f"malformed readings: {exc}")
        self.result.batches += 1
        self.clock.add(batch)
        self.result.readings += len(fresh)
        self.result.duplicates += len(batch.readings) - len(fresh)
        for reading in fresh:
            self._conform(batch.gateway, reading)
        return Checked(topic, batch, fresh)

    def _refused(self, topic: str, reason: str) -> Checked:
        self.result.rejected += 1
        self.result.last_error = reason
        return Checked(topic, None, [])

    def check_mark(self, payload: bytes) -> HighWaterMark | None:
        """Verify one high-water mark and record it; None when refused (counted in `rejected`,
        like a batch: an unknown, retired or out-of-date key, a bad signature, not a mark)."""
        trust = self.trust or TrustSet.of(self.opener.keys.values())
        try:
            mark = open_mark(payload, trust)
        except EnvelopeError as exc:
            self.result.rejected += 1
            self.result.rejected_marks += 1
            self.result.last_error = str(exc)
            return None
        self.tracker.mark(mark.gateway, mark.epoch, mark.seq, mark.batch, mark.sealed_ns)
        self.result.marks += 1
        return mark

    def _conform(self, gateway: str, reading: dict[str, Any]) -> None:
        """Apply the producer's value rules (edge_agent.reading) to a reading from the wire.

        A reading that breaks them (a NaN or infinite `v`, an integer beyond 64 bits, a value
        of no reading type, a non-finite number under any key) is counted, reported, and kept
        with `v` null and `q` bad, as the agent itself would have sent it: the output stays
        strict JSON and no such value passes for good. The batch is still accepted, so
        completeness is unaffected. Text is taken as it is (CBOR already refused invalid UTF-8);
        cutting it at a NUL is the producer's job, and the consumer does not second-guess it.
        """
        value = reading.get("v")
        reason = None
        try:
            if not isinstance(value, str):
                checked(value)
        except RejectedValue as exc:
            reason = str(exc)
        others = [k for k, v in reading.items() if isinstance(v, float) and not math.isfinite(v)]
        if reason is None and not others:
            return
        self.result.nonconforming += 1
        if self.result.first_nonconforming is None:
            point = f"{reading.get('src')}.{reading.get('pt')}"
            where = f"gateway={gateway} seq={reading.get('seq')} {point}"
            why = reason or f"non-finite {', '.join(others)}"
            self.result.first_nonconforming = f"{where}: {why}"
        for key in others:
            reading[key] = None
        if reason is not None:
            reading["v"], reading["q"] = None, "bad"

    def summary(self) -> tuple[int, list[str]]:
        """The exit status and the lines that explain it."""
        lines = []
        lost_count = 0
        pending_count = 0
        for (gateway, epoch), stream in self.tracker.streams.items():
            later = self.tracker.superseded(gateway, epoch)
            holes = stream.holes(superseded=later is not None)
            lines.append(
                f"gateway={gateway} epoch={epoch[:8]} readings={stream.readings} "
                f"max_seq={stream.max_seq} duplicates={stream.duplicates} "
                f"evicted={stream.evicted_count}"
                + "".join(f" evicted_{r}={n}" for r, n in sorted(stream.evicted_by_reason.items()))
                + f" hwm={stream.hwm_seq} conflicts={stream.conflicts}"
                + f" holes={len(holes)}"
                + (f" first_holes={holes[:5]}" if holes else "")
            )
            lines.extend(_tail_lines(gateway, epoch, stream, later))
            pending = stream.pending(superseded=later is not None)
            pending_count += 0 if pending is None else pending[1] - pending[0] + 1
            lost = stream.lost()
            if stream.ended is not None:
                count = sum(last - first + 1 for first, last in lost)
                lost_count += count
                lines.append(
                    f"LOST: gateway={gateway} epoch={epoch} readings={count} "
                    f"ranges={lost[:5]}{' ...' if len(lost) > 5 else ''} "
                    f"reason=the gateway declared the epoch ended ({stream.ended})"
                )
        lines.extend(self.clock.lines())
        for gateway, reason in self.tracker.unknown_ends:
            lines.append(
                f"LOST: gateway={gateway} epoch=unknown readings=unknown reason=the gateway "
                f"declared an epoch ended whose id it no longer knew ({reason})"
            )
        waiting = self.book.pending()
        lines.extend(_waiting_lines(waiting))
        code = 0
        conflicts = self.tracker.conflicts()
        if self.result.rejected:
            lines.append(self._rejected_line())
            code = EXIT_BAD_SIGNATURE
        if conflicts:
            first = next(s.first_conflict for s in self.tracker.streams.values() if s.conflicts)
            lines.append(
                f"CONFLICT {conflicts} readings: a seq received before came again in another "
                f"batch or with other content (a replay, a tamper by a holder of the key, or a "
                f"bug); first: {first}"
            )
            code = EXIT_BAD_SIGNATURE
        if code:
            pass
        elif self.tracker.holes() or waiting:
            if waiting:
                parked = sum(len(topics) for topics in waiting.values())
                lines.append(
                    f"INCOMPLETE: {parked} batches wait for a catalogue that did not come "
                    "(PENDING CATALOGUE above): their readings are not verified"
                )
            if self.tracker.holes():
                lines.append("INCOMPLETE: readings missing that no eviction explains")
            code = EXIT_GAP
        elif self.result.nonconforming:
            pass  # said below
        elif lost_count or self.tracker.unknown_ends:
            lines.append(
                f"OK: {self.result.batches} batches verified, complete but for the readings "
                "declared lost above"
            )
        elif pending_count:
            lines.append(
                f"OK: {self.result.batches} batches verified, complete but for the "
                f"{pending_count} readings pending above (sealed, not yet received)"
            )
        else:
            lines.append(f"OK: {self.result.batches} batches verified, complete")
        if self.result.nonconforming:  # readings not as §4 says: exit 3, like a rejection
            lines.append(
                f"NONCONFORMING {self.result.nonconforming} readings broke the value rules "
                f"(shown as bad, v null); first: {self.result.first_nonconforming}"
            )
            code = EXIT_BAD_SIGNATURE
        return code, lines

    def _rejected_line(self) -> str:
        """`REJECTED N batches[ and M high-water marks][ and K catalogues]: last reason`."""
        marks, catalogues = self.result.rejected_marks, self.result.rejected_catalogues
        batches = self.result.rejected - marks - catalogues
        others = [f"{marks} high-water marks"] if marks else []
        others += [f"{catalogues} catalogues"] if catalogues else []
        what = " and ".join([f"{batches} batches", *others])
        return f"REJECTED {what}: {self.result.last_error}"


def _waiting_lines(waiting: dict[bytes, list[str]]) -> list[str]:
    """One PENDING CATALOGUE line per catalogue that parked batches still wait for."""
    lines = []
    for digest, topics in waiting.items():
        gateways = sorted({_gateway_of(topic) for topic in topics})
        expected = sorted({_catalogue_topic_for(topic, digest) for topic in topics})
        lines.append(
            f"PENDING CATALOGUE: digest={digest.hex()} batches={len(topics)} "
            f"gateways={','.join(gateways)} (signature checked, not decoded: the catalogue "
            f"never came on {', '.join(expected[:3])}{' ...' if len(expected) > 3 else ''}; "
            "not verified)"
        )
    return lines


def _gateway_of(topic: str) -> str:
    """The gateway level of a batch topic `{prefix}/{gateway}/batch` ('?' when not one)."""
    levels = topic.split("/")
    return levels[-2] if len(levels) >= 2 and levels[-2] else "?"


def _catalogue_topic_for(topic: str, digest: bytes) -> str:
    """Where the catalogue of a batch that came on `topic` is published (§4.12); the pattern
    when the topic is not known (`Verifier.check` without one)."""
    base = topic.rsplit("/", 1)[0] if "/" in topic else "{prefix}/{gateway}"
    return f"{base}/catalogue/{digest.hex()}"


def _tail_lines(gateway: str, epoch: str, stream: Stream, later: str | None) -> list[str]:
    """The PENDING line (the sealed tail not received, while the epoch lives), the ENDED line
    (that tail made a hole by a later epoch) and the BATCHES line (batch-number gaps)."""
    lines = []
    tail = stream.tail()
    if tail is not None and stream.ended is None:
        first, last = tail
        where = f"gateway={gateway} epoch={epoch} readings={last - first + 1} seq={first}..{last}"
        if later is None:
            lines.append(f"PENDING: {where} (sealed, not yet received; the epoch is alive)")
        else:
            lines.append(
                f"ENDED: {where} sealed and never received: epoch {later} began after it "
                "without declaring it ended (a hole)"
            )
    gaps = stream.batch_gaps()
    above = max(0, stream.hwm_batch - stream.batches.highest())
    if gaps or above:
        missing = sum(b - a + 1 for a, b in gaps)
        lines.append(
            f"BATCHES: gateway={gateway} epoch={epoch} received={stream.batches.count()} "
            f"missing={missing} ranges={gaps[:5]}{' ...' if len(gaps) > 5 else ''} "
            f"pending={above} (an evicted batch's number never arrives: the seq check decides)"
        )
    return lines


def consumer_client(
    url: str,
    client_id: str,
    *,
    ca_file: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> aiomqtt.Client:
    """An MQTT 5 client with a persistent session, so nothing is missed across reconnects."""
    parts = urlsplit(url)
    tls = None
    if parts.scheme == "mqtts":
        tls = ssl.create_default_context(cafile=ca_file)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    return aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or (8883 if tls else 1883),
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
        tls_context=tls,
        username=username,
        password=password,
        max_queued_incoming_messages=0,  # unbounded: aiomqtt drops what overflows, after PUBACK
    )


async def consume(
    verifier: Verifier,
    client_factory: Callable[[], aiomqtt.Client],
    topic: str,
    on_batch: Callable[[Batch | None, list[dict[str, Any]]], None],
    stop: asyncio.Event,
    *,
    subscribed: asyncio.Event | None = None,
    acks: AckPublisher | None = None,
) -> None:
    """Receive batches until `stop` is set, reconnecting (quickly) when the broker goes away.

    `subscribed` is set once the first subscription is in place: from then on the persistent
    session holds every batch for this consumer, even while it is disconnected. `acks`, when
    given, acknowledges accepted batches while connected, on every connect, and once more
    before the consumer stops.
    """

    def handle(message: aiomqtt.Message) -> None:
        name = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if name.endswith("/status"):
            verifier.result.statuses[name] = payload.decode(errors="replace")
        elif name.endswith("/batch") or is_catalogue_topic(name):
            for checked in verifier.receive(name, payload):
                if checked.batch is not None and acks is not None:
                    acks.accepted(checked.batch, checked.topic)
                on_batch(checked.batch, checked.fresh)
        elif name.endswith(f"/{TOPIC_SUFFIX}") and verifier.check_mark(payload) is None:
            on_batch(None, [])  # refused: reported like a refused batch

    while not stop.is_set():
        client: aiomqtt.Client | None = None
        try:
            client = client_factory()
            async with client:
                for name in subscriptions(topic):
                    await client.subscribe(name, qos=1)
                if subscribed is not None:
                    subscribed.set()
                acking = None
                if acks is not None:
                    acks.reconnected()
                    acking = asyncio.create_task(acks.run(client))
                try:
                    messages = aiter(client.messages)
                    while (message := await _next_message(messages, stop)) is not None:
                        handle(message)
                    for message in _acknowledged(client):  # stopping: what paho has PUBACKed
                        handle(message)
                finally:
                    if acking is not None:
                        acking.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await acking
                if acks is not None:
                    await acks.flush(client)  # the final one, before the session ends
        except aiomqtt.MqttError as exc:
            log.debug("Verifier lost the broker error=%s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        finally:
            # PUBACKed by paho while the connection ended (lost, or closed by the stop): the
            # broker will not send them again, and the next connection is another client.
            for message in _acknowledged(client):
                handle(message)


def _acknowledged(client: aiomqtt.Client | None) -> list[aiomqtt.Message]:
    """Take the messages waiting in `client`'s queue, at once: paho acknowledged each as it
    queued it, so the broker never sends them again and they must be handled."""
    if client is None:
        return []
    queue = client._queue  # aiomqtt's iterator ends on a disconnect, queue or not
    taken = []
    while not queue.empty():
        taken.append(queue.get_nowait())
    return taken


def subscriptions(topic: str) -> list[str]:
    """The filters to subscribe to: `topic`, and beside a filter of batches (`.../batch`) the
    gateways' high-water marks (`.../hwm`) and point catalogues (`.../catalogue/+`, §4.12) it
    would otherwise miss. The catalogues' filter is an ordinary subscription, so the broker
    sends the retained catalogues published before it."""
    if topic.endswith("/batch"):
        base = topic.removesuffix("batch")
        return [topic, base + TOPIC_SUFFIX, base + "catalogue/+"]
    return [topic]


async def _next_message(
    messages: AsyncIterator[aiomqtt.Message], stop: asyncio.Event
) -> aiomqtt.Message | None:
    """The next message, or None once `stop` is set.

    Never waits for the stream to go quiet: behind a live gateway (a batch every second) it
    never does, and a consumer that waited for it ran on after SIGTERM or `--duration` until
    systemd killed it, its state unsaved. paho acknowledges a message as soon as it queues it,
    so the caller handles what is queued (`_acknowledged`) before it ends.
    """
    if stop.is_set():
        return None
    getter = asyncio.ensure_future(anext(messages))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if getter.done():
        return getter.result()
    try:  # a message the getter already took from the queue must not be dropped by a cancel
        return await asyncio.wait_for(getter, DRAIN_S)
    except TimeoutError:
        return None


def _no_credentials_in(url: str) -> None:
    """A password in `--url` would show in `ps` and in shell history: refused, never used."""
    if urlsplit(url).username is not None:
        raise ValueError(
            "--url: credentials in the URL are not allowed; use --username and --password-file"
        )


def trusted_keys(key_files: list[str], trust_files: list[str]) -> TrustSet:
    """The keys of `--key` (no limits) and of `--trust` files (validity, retirement), by kid.

    A key named in a trust file keeps that file's limits even when also given with `--key`.
    Raises ValueError (or OSError) naming the file when one cannot be used.
    """
    plain = TrustSet.of(load_public_key(Path(p)) for p in key_files)
    keys = dict(plain.keys)
    for name in trust_files:
        keys.update(TrustSet.load(Path(name)).keys)
    if not keys:
        raise ValueError("give at least one --key or --trust")
    return TrustSet(keys.values())


def _ack_key(args: argparse.Namespace) -> Ed25519PrivateKey | None:
    """The consumer key of `--ack-key`, checked as a signing key is; ValueError without
    `--state` (an acknowledgement says what the state file holds)."""
    if not getattr(args, "ack_key", None):
        return None
    if not args.state:
        raise ValueError("--ack-key needs --state: an acknowledgement says what the state holds")
    return load_private_key(Path(args.ack_key))


def run_verify(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trust = trusted_keys(args.key or [], args.trust or [])
        _no_credentials_in(args.url)
        password = read_secret_file(Path(args.password_file)) if args.password_file else None
        ack_key = _ack_key(args)
    except (OSError, ValueError) as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    tracker = Completeness()
    state = Path(args.state) if args.state else None
    if state is not None and state.exists():
        tracker = Completeness.from_json(json.loads(state.read_text()))
    verifier = Verifier(Opener(trust.public_keys()), tracker, trust)
    topic = args.topic
    acks = None
    if ack_key is not None and state is not None:
        acks = AckPublisher(ack_key, tracker, state)

    def show(batch: Batch | None, fresh: list[dict[str, Any]]) -> None:
        if batch is None:
            print(f"REJECTED: {verifier.result.last_error}", file=sys.stderr, flush=True)
            return
        if batch.evicted and not args.quiet:
            declared = [
                f"{first}..{last} ({reason})"
                for (first, last), reason in zip(batch.evicted, batch.evicted_reasons, strict=True)
            ]
            print(f"# gateway={batch.gateway} declared evicted {', '.join(declared)}", flush=True)
        if args.quiet:
            return
        for r in fresh:
            if args.json:  # strict JSON: values were conformed by the Verifier (no NaN)
                print(json.dumps({"gateway": batch.gateway, **r}, allow_nan=False), flush=False)
            else:
                print(
                    f"{batch.gateway} {r['seq']:>8} {r['src']}.{r['pt']} = {r['v']!r} "
                    f"({r['q']}) ts={r['ts']}",
                    flush=False,
                )
        sys.stdout.flush()
        if args.count and verifier.result.readings >= args.count:
            stop.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.duration:
            loop.call_later(args.duration, stop.set)
        await consume(
            verifier,
            lambda: consumer_client(
                args.url,
                args.client_id,
                ca_file=args.ca_file,
                username=args.username,
                password=password,
            ),
            topic,
            show,
            stop,
            acks=acks,
        )

    stop = asyncio.Event()
    started = time.monotonic()
    asyncio.run(main())
    if state is not None:  # atomic and durable: a crash leaves the old state or the new
        save_state(state, json.dumps(tracker.to_json()))
    code, lines = verifier.summary()
    for line in lines:
        print(line, file=sys.stderr)
    print(f"verify ran {time.monotonic() - started:.1f}s", file=sys.stderr)
    return code
