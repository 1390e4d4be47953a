"""The .deb on a booted Debian 12 (systemd 252 as PID 1 in systemd-nspawn, no network inside).

The steps an operator takes, in order, on one machine: install offline, configure, run under
systemd (READY=1, /healthz), survive a hung agent (the watchdog), reload an edited config and
refuse a broken one, upgrade keeping an edited conffile and the buffer, purge. Each test is one
step and relies on the ones before it (pytest runs a module's tests in order). Times are written
to build/system-stage.json for the CI log.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.machine import Machine, build_deb, copy_rootfs, debian_rootfs

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]
"""1800 s: the first test's fixtures build two packages and, on a cold cache, the rootfs."""

REPO = Path(__file__).resolve().parents[1]
MEASURES: dict[str, Any] = {}
CONFIG = """\
# Edited by the operator (the test).
gateway:
  id: nspawn-gw
mqtt:
  url: mqtt://127.0.0.1:1883          # no broker: readings stay in the buffer
  username: agent
  password_file: ${CREDENTIALS_DIRECTORY:-/etc/edge-agent/credentials}/mqtt-password
signing:
  key_file: ${CREDENTIALS_DIRECTORY:-/etc/edge-agent}/signing.key
batch:
  max_delay: 200ms
sources:
  - type: simulated
    name: sim
    interval: 100ms
    points: 5
"""
WATCHDOG_DROP_IN = "[Service]\nWatchdogSec=3s\nRestartSec=1s\n"
"""The test's own drop-in: the shipped WatchdogSec=60 would make the test wait a minute."""
SNAPSHOT_DIRS = ("/etc", "/opt", "/usr", "/var/lib", "/lib")
SNAPSHOT_IGNORED = re.compile(
    r"^/var/lib/(apt|dpkg|systemd|dbus)/|^/etc/(ld\.so\.cache|machine-id)$|"
    r"^/etc/(passwd|group|shadow|gshadow)-$|^/etc/\.pwd\.lock$|^/usr/lib/python3\.11/.*__pycache__"
)
"""Package-manager and systemd state, and the backups user tools keep: not the package's files."""


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    began = time.monotonic()
    first = build_deb(out, revision="1")
    MEASURES["build_s"] = round(time.monotonic() - began, 1)
    second = build_deb(out, revision="2", lintian=False)  # the "newer build" of the upgrade
    MEASURES["deb_bytes"] = first.stat().st_size
    return {"1": first, "2": second}


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, debs: dict[str, Path]) -> Iterator[Machine]:
    began = time.monotonic()
    cached = debian_rootfs("amd64")
    MEASURES["rootfs_s"] = round(time.monotonic() - began, 1)
    directory = tmp_path_factory.mktemp("machine")
    root = copy_rootfs(cached, directory / "root")
    for revision, deb in debs.items():
        (root / "root" / f"edge-agent-{revision}.deb").write_bytes(deb.read_bytes())
    box = Machine(root, directory / "console.log")
    began = time.monotonic()
    try:
        box.boot()
        MEASURES["boot_s"] = round(time.monotonic() - began, 1)
        yield box
    finally:
        box.poweroff()
        shutil.rmtree(root, ignore_errors=True)  # a few hundred MB
        out = REPO / "build" / "system-stage.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(MEASURES, indent=2) + "\n")


def status(box: Machine) -> dict[str, Any]:
    """`edge-agent status --json` inside: the agent's /status."""
    result = box.run(["edge-agent", "status", "--json"], check=False)
    assert result.stdout, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def show(box: Machine, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", "edge-agent", *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    """Poll a state inside the container (no event crosses into it) until true, or fail."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.25)


def listing(box: Machine) -> set[str]:
    out = box.run(["find", *SNAPSHOT_DIRS, "-xdev"]).stdout.splitlines()
    return {p for p in out if not SNAPSHOT_IGNORED.search(p)}


BEFORE: dict[str, set[str]] = {}


def test_offline_install_makes_the_user_and_key_and_waits_for_a_config(machine: Machine) -> None:
    BEFORE["files"] = listing(machine)
    began = time.monotonic()
    result = machine.run(["apt-get", "install", "-y", "/root/edge-agent-1.deb"])
    MEASURES["install_offline_s"] = round(time.monotonic() - began, 1)
    assert "Setting up edge-agent (0.1.0-1)" in result.stdout
    assert "not started: edit /etc/edge-agent/agent.yaml" in result.stdout, "example config"
    assert machine.run(["id", "-nG", "edge-agent"]).stdout.split() == ["edge-agent", "dialout"]
    key = machine.run(["stat", "-c", "%a %U", "/etc/edge-agent/signing.key"]).stdout.split()
    assert key == ["600", "root"], "only root reads the key; the unit passes it as a credential"
    assert machine.run(["systemctl", "is-enabled", "edge-agent"]).stdout.strip() == "enabled"
    assert machine.run(["edge-agent", "--version"]).stdout.strip() == "edge-agent 0.1.0"
    conffiles = machine.run(["cat", "/var/lib/dpkg/info/edge-agent.conffiles"]).stdout
    assert conffiles.split() == ["/etc/edge-agent/agent.yaml"]


def test_the_unit_reaches_active_running_through_ready(machine: Machine) -> None:
    machine.path("/etc/edge-agent/agent.yaml").write_text(CONFIG)
    machine.run(["systemctl", "start", "edge-agent"])  # Type=notify: returns after READY=1
    props = show(machine, "ActiveState", "SubState", "StatusText", "Type", "NotifyAccess")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["Type"] == "notify"
    assert "sources up" in props["StatusText"], props
    assert (
        "Active: active (running)"
        in machine.run(["systemctl", "status", "edge-agent", "--no-pager"], check=False).stdout
    )
    verify = machine.run(["systemd-analyze", "verify", "/lib/systemd/system/edge-agent.service"])
    assert verify.stderr == "", verify.stderr


def test_healthz_answers_inside_and_logs_carry_priorities(machine: Machine) -> None:
    probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8710/healthz').read())"
    assert machine.run(["python3.11", "-c", probe]).stdout.strip() == """b'{"alive": true}'"""
    wait_until(lambda: status(machine)["sources"]["sim"]["up"], 30, "the source")
    journal = machine.run(["journalctl", "-u", "edge-agent", "-o", "json"]).stdout
    entries = [json.loads(line) for line in journal.splitlines()]
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "edge-agent"]
    started = [e for e in ours if "Started gateway=nspawn-gw" in e["MESSAGE"]]
    assert started and started[0]["PRIORITY"] == "6", "info, from the <6> prefix"
    assert not any(e["MESSAGE"].startswith("<") for e in ours), "prefixes parsed, not shown"
    assert not any(re.match(r"\d{4}-\d\d-\d\d", e["MESSAGE"]) for e in ours), "no own timestamp"


def test_a_stopped_agent_is_killed_by_the_watchdog_and_restarted_with_its_buffer(
    machine: Machine,
) -> None:
    drop_in = machine.path("/etc/systemd/system/edge-agent.service.d/test-watchdog.conf")
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(WATCHDOG_DROP_IN)
    machine.run(["systemctl", "daemon-reload"])
    machine.run(["systemctl", "restart", "edge-agent"])
    wait_until(lambda: status(machine)["buffer"]["readings"] > 100, 30, "a backlog")
    before = status(machine)["buffer"]
    pid = show(machine, "MainPID")["MainPID"]
    machine.run(["systemctl", "kill", "--signal=SIGSTOP", "edge-agent"])
    began = time.monotonic()
    wait_until(
        lambda: (
            show(machine, "NRestarts")["NRestarts"] == "1"
            and show(machine, "ActiveState")["ActiveState"] == "active"
        ),
        60,
        "the watchdog to kill and systemd to restart the agent",
    )
    MEASURES["watchdog_restart_s"] = round(time.monotonic() - began, 1)
    assert show(machine, "MainPID")["MainPID"] != pid
    journal = machine.run(["journalctl", "-u", "edge-agent", "--no-pager"]).stdout
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal
    after = status(machine)["buffer"]
    assert after["epoch"] == before["epoch"], "the same buffer, not a new one"
    assert after["next_seq"] >= before["next_seq"]
    assert after["readings"] >= before["readings"], "every sealed reading is still buffered"
    drop_in.unlink()
    drop_in.parent.rmdir()
    machine.run(["systemctl", "daemon-reload"])


def test_systemctl_reload_applies_an_edited_config(machine: Machine) -> None:
    pid = show(machine, "MainPID")["MainPID"]
    before = status(machine)["buffer"]
    edited = CONFIG + "  - {type: simulated, name: added, interval: 200ms, points: 2}\n"
    machine.path("/etc/edge-agent/agent.yaml").write_text(edited)
    machine.run(["systemctl", "reload", "edge-agent"])
    wait_until(lambda: "added" in status(machine)["sources"], 20, "the added source")
    assert show(machine, "MainPID")["MainPID"] == pid, "reloaded, not restarted"
    after = status(machine)["buffer"]
    assert after["epoch"] == before["epoch"] and after["readings"] >= before["readings"]
    journal = machine.run(["journalctl", "-u", "edge-agent", "--no-pager"]).stdout
    assert "Reloaded file=/etc/edge-agent/agent.yaml applied=sources+=added" in journal


def test_an_invalid_edit_is_refused_and_the_service_keeps_running(machine: Machine) -> None:
    pid = show(machine, "MainPID")["MainPID"]
    good = machine.path("/etc/edge-agent/agent.yaml").read_text()
    machine.path("/etc/edge-agent/agent.yaml").write_text(
        good.replace("interval: 200ms", "interval: often")
    )
    result = machine.run(["systemctl", "reload", "edge-agent"], check=False)
    assert result.returncode != 0, "systemctl reload reports the refusal"
    props = show(machine, "ActiveState", "SubState", "MainPID")
    assert (props["ActiveState"], props["SubState"], props["MainPID"]) == ("active", "running", pid)
    entries = [
        json.loads(line)
        for line in machine.run(
            ["journalctl", "-u", "edge-agent", "-o", "json", "-n", "30"]
        ).stdout.splitlines()
    ]
    located = [e for e in entries if "sources[1].interval" in e.get("MESSAGE", "")]
    assert located and located[0]["MESSAGE"].startswith("/etc/edge-agent/agent.yaml:"), located
    assert located[0]["PRIORITY"] == "3"
    assert set(status(machine)["sources"]) == {"sim", "added"}, "the running config is kept"
    machine.path("/etc/edge-agent/agent.yaml").write_text(good)


def test_the_documented_online_backup_copies_the_buffer(machine: Machine) -> None:
    """docs/operations.md, Back up the buffer: the command as written there, the agent running."""
    doc = (REPO / "docs" / "operations.md").read_text()
    command = doc.split("## Back up the buffer", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    machine.sh(command.replace("$(date +%F)", "test").replace("sudo ", ""))  # we are root
    epoch = status(machine)["buffer"]["epoch"]
    read = (
        "import sqlite3; print(sqlite3.connect('/root/buffer-test.db').execute("
        "\"SELECT value FROM meta WHERE key = 'epoch'\").fetchone()[0])"
    )
    assert machine.run(["python3.11", "-c", read]).stdout.strip() == epoch
    left = machine.run(["find", "/var/lib/edge-agent", "!", "-user", "edge-agent"]).stdout
    assert left == "", f"files the agent could not open: {left}"


def test_security_inside_agrees_with_the_offline_score(machine: Machine) -> None:
    def score(*args: str) -> float:
        out = machine.run(["systemd-analyze", "security", "--no-pager", *args]).stdout
        match = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d)", out)
        assert match, out
        return float(match.group(1))

    live = score("edge-agent.service")
    offline = score("--offline=yes", "/lib/systemd/system/edge-agent.service")
    MEASURES["security_score"] = live
    assert live == offline <= 1.5


def test_an_upgrade_keeps_the_edited_conffile_and_the_buffer(machine: Machine) -> None:
    edited = machine.path("/etc/edge-agent/agent.yaml").read_text()
    before = status(machine)["buffer"]
    pid = show(machine, "MainPID")["MainPID"]
    kid = machine.run(["sha256sum", "/etc/edge-agent/signing.key"]).stdout
    result = machine.run(["apt-get", "install", "-y", "/root/edge-agent-2.deb"])
    assert "Unpacking edge-agent (0.1.0-2) over (0.1.0-1)" in result.stdout, result.stdout
    assert machine.path("/etc/edge-agent/agent.yaml").read_text() == edited
    assert machine.run(["sha256sum", "/etc/edge-agent/signing.key"]).stdout == kid
    props = show(machine, "ActiveState", "MainPID")
    assert props["ActiveState"] == "active" and props["MainPID"] != pid, "restarted on upgrade"
    wait_until(lambda: status(machine)["ready"], 30, "the upgraded agent")
    after = status(machine)["buffer"]
    assert after["epoch"] == before["epoch"], "the buffer survives the upgrade"
    assert after["readings"] >= before["readings"]


def test_purge_removes_what_it_should_and_nothing_else(machine: Machine) -> None:
    machine.sh("mkdir -p /etc/edge-agent/tls && echo operator > /etc/edge-agent/tls/ca.pem")
    machine.run(["apt-get", "purge", "-y", "edge-agent"])
    after = listing(machine)
    for gone in ("/opt/edge-agent", "/var/lib/edge-agent", "/etc/edge-agent/agent.yaml",
                 "/etc/edge-agent/signing.key", "/lib/systemd/system/edge-agent.service",
                 "/usr/bin/edge-agent", "/usr/lib/sysusers.d/edge-agent.conf"):  # fmt: skip
        assert gone not in after, f"{gone} is left after purge"
    kept = {"/etc/edge-agent", "/etc/edge-agent/tls", "/etc/edge-agent/tls/ca.pem"}
    assert after - BEFORE["files"] == kept, "only the operator's own file (and its folders)"
    assert BEFORE["files"] - after == set(), "nothing that was there before is removed"
    assert machine.run(["systemctl", "is-active", "edge-agent"], check=False).stdout.strip() in (
        "inactive",
        "unknown",
    )
