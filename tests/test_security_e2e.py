"""Security, end to end, with the real `edge-agent run` process (issue 11):

- a key rotation by restarting the agent with the next key mid-stream, with a backlog signed by
  the old key still in the buffer: `edge-agent verify --trust` rejects nothing, loses nothing;
- secrets planted in files (systemd's $CREDENTIALS_DIRECTORY) while things fail: none appears
  in anything printed or served;
- 1,000 concurrent connections to the health endpoint from loopback: forwarding goes on, and
  the health endpoint is the only listening socket.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers.agent import AgentProcess, agent_config
from helpers.ports import free_port
from helpers.wait import deadline, wait_for

from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.envelope import Opener
from edge_agent.seal.keys import key_id, load_public_key

pytestmark = pytest.mark.e2e

SIMULATED = [{"type": "simulated", "name": "sim", "interval": "50ms", "points": 10}]


def sealed_count(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(next_seq) - 1


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip


class VerifyProcess:
    """`edge-agent verify` running in the background, its readings counted from its stdout."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.out = directory / "verify.out"
        self.err = directory / "verify.err"
        # A short first run makes the persistent session, so nothing is missed before start.
        created = cli(*args, "--duration", "1", "-q")
        assert created.returncode == 0, created.stderr
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", *args], stdout=out, stderr=err
            )

    def readings(self) -> int:
        return sum(1 for line in self.out.read_text().splitlines() if not line.startswith("#"))

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        return code, self.err.read_text()


async def test_rotation_by_restart_with_the_next_key_rejects_nothing_loses_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    made = cli("keygen", "--out", str(keys), "--next")
    assert made.returncode == 0, made.stderr
    next_kid = made.stdout.strip()
    next_key = keys / f"signing-{next_kid}.key"
    assert (keys / "signing.key").exists() and next_key.exists()
    trust = tmp_path / "trust.yaml"
    trust.write_text(yaml.safe_dump({"keys": [
        {"public_key": str(keys / "signing.pub")},
        {"public_key": str(next_key.with_suffix(".pub")), "kid": next_kid,
         "not_before": "2020-01-01T00:00:00Z"},
    ]}))  # fmt: skip
    verify = VerifyProcess(tmp_path, "verify", "--url", broker.url, "--trust", str(trust),
                           "--topic", "site/test/#", "--client-id", "rotation")  # fmt: skip
    config = agent_config(tmp_path, broker, keys, SIMULATED)
    first = AgentProcess(config, tmp_path)
    agents.append(first)
    first.start()
    await wait_for(lambda: verify.readings() > 200, 30, "readings signed with the first key")
    broker.stop()  # a backlog signed with the old key stays in the buffer over the rotation
    await wait_for(lambda: not first.status()["mqtt"]["connected"], 10, "the outage noticed")
    await wait_for(lambda: first.status()["buffer"]["readings"] > 100, 10, "a backlog")
    assert first.stop() == 0, first.log()
    backlog = sealed_count(tmp_path / "buffer.db")

    config["signing"]["key_file"] = str(next_key)  # the rotation: the agent names the new key
    second = AgentProcess(config, tmp_path)
    agents.append(second)
    broker.start()
    second.start()
    await wait_for(lambda: verify.readings() > backlog + 200, 30, "readings after the rotation")
    assert second.stop() == 0, second.log()
    sealed = sealed_count(tmp_path / "buffer.db")
    await wait_for(lambda: verify.readings() >= sealed, 30, "every sealed reading")
    code, summary = verify.stop()

    assert code == 0, summary
    assert "OK:" in summary and "holes=0" in summary, summary
    assert f"max_seq={sealed}" in summary and f"readings={sealed}" in summary, summary
    assert "REJECTED" not in summary
    first_kid = key_id(load_public_key(keys / "signing.pub")).hex()
    loaded = re.findall(r"action=loaded kid=([0-9a-f]+)", second.log())  # both runs' log
    assert loaded == [first_kid, next_kid], "the restart signs with the next key"


def plant(directory: Path, name: str, secret: str) -> Path:
    path = directory / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


async def test_no_planted_secret_appears_in_anything_printed_or_served(
    tmp_path: Path, keys: Path, agents: list[AgentProcess]
) -> None:
    """Secrets from $CREDENTIALS_DIRECTORY; the broker refuses the password, the OPC UA server
    is missing, a bad configuration and a bad key are tried: every output is searched."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    secrets = {
        "mqtt": "mqtt-Pa55-7f3a91c2e8",
        "opcua": "opcua-Pa55-0b9d44e1aa",
        "inline": "inline-Pa55-5c2e7788dd",
    }
    plant(credentials, "mqtt-password", secrets["mqtt"])
    plant(credentials, "opcua-password", secrets["opcua"])
    key_text = (keys / "signing.key").read_text()
    (credentials / "signing.key").write_text(key_text)
    (credentials / "signing.key").chmod(0o400)
    secrets["signing key"] = key_text.splitlines()[1]  # the base64 body of the PEM

    passwd = tmp_path / "broker-passwd"
    made = subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "agent", "right-one"],
                          capture_output=True, check=False)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(directory=tmp_path / "broker",
                       extra_config=f"allow_anonymous false\npassword_file {passwd}\n")  # fmt: skip
    broker.start()
    try:
        sources = [
            *SIMULATED,
            {"type": "opcua", "name": "ua", "endpoint": f"opc.tcp://127.0.0.1:{free_port()}",
             "security": {"policy": "None"}, "timeout": "1s", "reconnect_max": "1s",
             "auth": {"username": "reader",
                      "password_file": "${CREDENTIALS_DIRECTORY}/opcua-password"},
             "nodes": [{"name": "n", "node_id": "ns=2;i=1"}]},
        ]  # fmt: skip
        config = agent_config(tmp_path, broker, keys, sources)
        config["mqtt"].update(username="agent",
                              password_file="${CREDENTIALS_DIRECTORY}/mqtt-password")  # fmt: skip
        config["signing"]["key_file"] = "${CREDENTIALS_DIRECTORY}/signing.key"
        os.environ["CREDENTIALS_DIRECTORY"] = str(credentials)
        printed: dict[str, str] = {}
        try:
            agent = AgentProcess(config, tmp_path)
            agents.append(agent)
            agent.start()
            await wait_for(lambda: "category=authentication" in agent.log(), 20,
                           "the broker's refusal, as an audit event")  # fmt: skip
            await wait_for(lambda: agent.status()["sources"]["ua"]["errors"] > 0, 20,
                           "the OPC UA source's failure")  # fmt: skip
            for path in ("/status", "/metrics", "/healthz", "/readyz"):
                try:
                    with urllib.request.urlopen(agent.health_url + path, timeout=5) as answer:
                        printed[path] = answer.read().decode()
                except urllib.error.HTTPError as refused:  # /readyz may say 503
                    printed[path] = refused.read().decode()
            assert not agent.status()["mqtt"]["connected"]
            assert "not authori" in agent.status()["mqtt"]["last_error"].lower()
            assert 'edge_agent_audit_events_total{category="authentication"' in printed["/metrics"]
            assert agent.stop() == 0
            printed["agent log"] = agent.log()

            # A bad configuration holding secrets, through check-config and run.
            bad = dict(config, mqtt={**config["mqtt"], "url": f"mqtt://agent:{secrets['inline']}"
                                     f"@127.0.0.1:{broker.port}"})  # fmt: skip
            bad["mqtt"].pop("password_file")
            bad["mqtt"]["password"] = secrets["inline"]
            bad["store"] = {"max_bytes": [secrets["inline"]]}
            bad_path = tmp_path / "bad.yaml"
            bad_path.write_text(yaml.safe_dump(bad))
            for command in (("check-config", str(bad_path)), ("run", "-c", str(bad_path))):
                result = cli(*command)
                assert result.returncode == 1, result.stderr
                printed[" ".join(command[:1])] = result.stdout + result.stderr

            # A signing key file that holds a secret instead of a key.
            plant(credentials, "not-a-key", secrets["inline"])
            config["signing"]["key_file"] = "${CREDENTIALS_DIRECTORY}/not-a-key"
            (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
            result = cli("run", "-c", str(tmp_path / "agent.yaml"))
            assert result.returncode == 1 and "not an unencrypted PEM private key" in result.stderr
            printed["bad key"] = result.stdout + result.stderr
        finally:
            del os.environ["CREDENTIALS_DIRECTORY"]
    finally:
        broker.stop()

    found = [(what, where) for what, secret in secrets.items()
             for where, text in printed.items() if secret in text]  # fmt: skip
    assert found == [], f"secrets found: {found}"
    assert len(printed) == 8
    assert "category=authentication outcome=failure" in printed["agent log"]


async def open_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
    return writers


def listening_sockets(pid: int) -> list[str]:
    """`address:port` of every TCP socket the process listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                host = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
                found.append(f"{host if table == 'tcp' else address}:{int(port, 16)}")
    return found


async def test_forwarding_goes_on_under_1000_health_connections_the_only_listener(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    verifier = Verifier(Opener([load_public_key(keys / "signing.pub")]))
    stop, subscribed = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(consume(
        verifier, lambda: consumer_client(broker.url, f"flood-{broker.port}"), "site/test/#",
        lambda batch, fresh: None, stop, subscribed=subscribed,
    ))  # fmt: skip
    async with deadline(10, "the verifier's subscription"):
        await subscribed.wait()
    agent = AgentProcess(agent_config(tmp_path, broker, keys, SIMULATED), tmp_path)
    agents.append(agent)
    agent.start()
    assert agent.process is not None
    port = int(agent.health_url.rsplit(":", 1)[1])
    assert listening_sockets(agent.process.pid) == [f"127.0.0.1:{port}"]

    await wait_for(lambda: verifier.result.readings > 100, 20, "forwarding before the flood")
    writers = await open_connections(port, 1000)
    held = sum(1 for w in writers if not w.is_closing())
    before, started = verifier.result.readings, time.monotonic()
    await wait_for(lambda: verifier.result.readings > before + 400, 20,
                   "forwarding under 1,000 health connections")  # fmt: skip
    rate = (verifier.result.readings - before) / (time.monotonic() - started)
    for writer in writers:
        writer.close()
    await wait_for(lambda: _answers(agent), 20, "the health endpoint to answer again")
    assert agent.stop() == 0, agent.log()
    stop.set()
    async with deadline(10, "the verifier to stop"):
        await task

    assert held == 1000
    assert rate > 100, f"{rate:.0f} readings/s under the flood (the source makes 200/s)"
    assert verifier.result.rejected == 0
    log = agent.log()
    assert "connection limit" in log
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


def _answers(agent: AgentProcess) -> bool:
    try:
        agent.status()
    except OSError:
        return False
    return True
