"""Benchmark: 1,000 monitored items sampled every 100 ms; CPU of the agent side and lost count.

The server (asyncua) runs in a separate process, so its CPU is not counted. It changes every
variable once per round (every 100 ms) for a fixed number of rounds and reports how many values
it published; the agent side runs the real OpcuaSource and counts the readings it emits. Target:
under 25 % of one core for the agent process, and no notification lost.

    .venv/bin/python bench/opcua_subscribe.py [--items 1000] [--rounds 100] [--secure]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from asyncua import Server, ua

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.config.opcua import OpcuaSourceConfig  # noqa: E402
from edge_agent.sources.opcua.source import OpcuaSource  # noqa: E402


async def serve(port: int, items: int, rounds: int, period: float, cert_dir: str | None) -> None:
    """The server process: wait for GO on stdin, run the rounds, print DONE <published>."""
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
    if cert_dir:
        from asyncua.crypto import cert_gen  # noqa: PLC0415
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.x509 import UniformResourceIdentifier  # noqa: PLC0415
        from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415

        key = cert_gen.generate_private_key()
        cert = cert_gen.generate_self_signed_app_certificate(
            key,
            "bench",
            {},
            [UniformResourceIdentifier("urn:freeopcua:python:server")],
            extended=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        await server.load_certificate(cert.public_bytes(serialization.Encoding.DER))
        await server.load_private_key(cert_gen.dump_private_key_as_pem(key), format="pem")
        (Path(cert_dir) / "server.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:bench")
    folder = await server.nodes.objects.add_object(ns, "Bench")
    ids = []
    for i in range(items):
        node = await folder.add_variable(ua.NodeId(f"v{i}", ns), f"v{i}", 0.0)
        ids.append(node.nodeid)
    async with server:
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        published = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        progress = os.environ.get("BENCH_PROGRESS_FILE")  # bench/modbus_load.py reads it
        for r in range(1, rounds + 1):
            if progress:
                Path(progress).write_text(str(published))  # noqa: ASYNC240 - a few bytes
            now = dt.datetime.now(dt.UTC)
            for node_id in ids:
                value = ua.DataValue(
                    ua.Variant(float(r), ua.VariantType.Double),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                )
                await server.write_attribute_value(node_id, value)
                published += 1
            await asyncio.sleep(max(0.0, start + r * period - loop.time()))
        elapsed = loop.time() - start
        print(f"DONE {published} {elapsed:.2f}", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def measure(items: int, rounds: int, period: float, secure: bool) -> int:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--items",
            str(items),
            "--rounds",
            str(rounds),
            "--period",
            str(period),
        ]
        if secure:
            args += ["--cert-dir", tmp]
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        assert (await proc.stdout.readline()).startswith(b"READY")
        security = (
            {
                "policy": "Basic256Sha256",
                "mode": "SignAndEncrypt",
                "server_certificate": f"{tmp}/server.der",
                "pki_dir": f"{tmp}/pki",
            }
            if secure
            else {"policy": "None"}
        )
        config = OpcuaSourceConfig.model_validate(
            {
                "type": "opcua",
                "name": "bench",
                "endpoint": f"opc.tcp://127.0.0.1:{port}/bench/",
                "security": security,
                "interval": f"{int(period * 1000)}ms",
                "sampling_interval": f"{int(period * 1000)}ms",
                "nodes": [{"name": f"v{i}", "node_id": f"ns=2;s=v{i}"} for i in range(items)],
            }
        )
        received = 0
        initial, complete = asyncio.Event(), asyncio.Event()
        published = -1

        async def emit(readings: object) -> None:
            nonlocal received
            received += len(readings)  # type: ignore[arg-type]
            if received >= items:
                initial.set()
            if published >= 0 and received >= published:
                complete.set()

        source = OpcuaSource(config)
        task = asyncio.create_task(source.run(emit))
        await asyncio.wait_for(initial.wait(), 60)
        received -= items  # the initial values are not part of the rounds
        cpu0, wall0 = time.process_time(), time.monotonic()
        proc.stdin.write(b"GO\n")
        done = (await proc.stdout.readline()).split()
        published, server_elapsed = int(done[1]), float(done[2])
        if received < published:
            with contextlib.suppress(TimeoutError):  # a shortfall is reported as lost below
                await asyncio.wait_for(complete.wait(), 10)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        proc.stdin.write(b"STOP\n")
        await proc.wait()
    rate = published / server_elapsed
    print(
        f"items={items} period={period * 1000:.0f}ms rounds={rounds} "
        f"security={'Basic256Sha256/SignAndEncrypt' if secure else 'None'}"
    )
    print(f"server published {published} changes in {server_elapsed:.1f}s ({rate:,.0f}/s)")
    print(f"agent received {received}; lost {published - received}")
    print(
        f"agent CPU {cpu:.2f}s over {wall:.1f}s = {100 * cpu / wall:.1f}% of one core "
        f"({1e6 * cpu / max(received, 1):.1f} us per notification)"
    )
    return 0 if received == published and cpu / wall < 0.25 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--period", type=float, default=0.1)
    parser.add_argument("--secure", action="store_true")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cert-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.items, args.rounds, args.period, args.cert_dir))
        return 0
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return asyncio.run(measure(args.items, args.rounds, args.period, args.secure))


if __name__ == "__main__":
    raise SystemExit(main())
