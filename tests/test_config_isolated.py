"""The configuration read in a child process (`load_config_isolated`, what `edge-agent run` does):
the same outcome as in process, problems and errors to the letter, and the agent built from the
child's compact hand-off (`Blueprint`) is the agent built from the validated config.

Why it exists (the memory of loading stays in the child): docs/performance.md, issue 10.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.processes import ORPHAN_WATCH, forked_child
from helpers.sample_configs import TWO_PLCS_AND_SIM

from edge_agent.blueprint import Blueprint
from edge_agent.config import load_config
from edge_agent.config.isolated import load_config_isolated
from edge_agent.errors import ConfigError
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.integration  # each load forks a child

GOOD = TWO_PLCS_AND_SIM

BAD: dict[str, str | bytes] = {
    "five mistakes": (
        "gateway:\n  id: pit3 gw\nstore:\n  max_bytes: lots\nmqtt:\n  url: http://b:1883\n"
        "  colour: blue\nsources:\n  - type: modbus\n    name: plc\n    host: 10.0.0.5\n"
        "    points:\n      - {name: a, register: holding, address: 1, type: float33}\n"
    ),
    "not YAML": "gateway: {id: gw\nsources: [\n",
    "an alias": "a: &x [1, 2]\nb: *x\n",
    "not UTF-8": b"gateway: {id: \xff}\n",
    "empty": "",
    "a missing key file": "gateway: {id: g}\nsigning: {key_file: /nonexistent/k}\n"
    "sources:\n  - {type: simulated, name: s}\n",
    "overlapping registers": (
        "gateway: {id: g}\nsources:\n  - type: modbus\n    name: p\n    host: h\n    points:\n"
        "      - {name: a, register: holding, address: 0, type: float32}\n"
        "      - {name: b, register: holding, address: 1, type: uint16}\n"
    ),
}


@pytest.fixture
def good(tmp_path: Path) -> Path:
    write_keypair(tmp_path / "keys")
    path = tmp_path / "agent.yaml"
    path.write_text(GOOD.format(dir=tmp_path))
    return path


@pytest.fixture(params=[False, True], ids=["forked", "fresh interpreter"])
def fresh(request: pytest.FixtureRequest) -> bool:
    """Both ways of loading in a child: forked (start-up), a fresh interpreter (reload)."""
    return bool(request.param)


def test_a_valid_file_gives_what_loading_in_process_gives(good: Path, fresh: bool) -> None:
    isolated = load_config_isolated(good, Blueprint.of, fresh_interpreter=fresh)
    here = Blueprint.of(load_config(good))
    assert isolated == here
    assert [len(s.points) for s in isolated.config.sources if s.type == "modbus"] == [0, 0]
    assert [len(t) for t in isolated.prepared.parts.values()] == [42, 300]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(BAD))
def test_an_invalid_file_gives_the_same_located_problems(
    tmp_path: Path, name: str, fresh: bool
) -> None:
    path = tmp_path / "bad.yaml"
    text = BAD[name]
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as here:
        load_config(path)
    with pytest.raises(ConfigError) as isolated:
        load_config_isolated(path, Blueprint.of, fresh_interpreter=fresh)
    assert str(isolated.value) == str(here.value)
    assert isolated.value.filename == here.value.filename
    assert isolated.value.problems == here.value.problems


@pytest.mark.parametrize("where", ["absent.yaml", "."])
def test_an_unreadable_file_gives_the_same_os_error(
    tmp_path: Path, where: str, fresh: bool
) -> None:
    path = tmp_path / where
    with pytest.raises(OSError) as here:
        load_config(path)
    with pytest.raises(OSError) as isolated:
        load_config_isolated(path, Blueprint.of, fresh_interpreter=fresh)
    assert type(isolated.value) is type(here.value)
    got, want = isolated.value, here.value
    assert (got.errno, got.strerror, got.filename) == (want.errno, want.strerror, want.filename)
    assert str(got) == str(want)


def test_a_child_that_fails_leaves_the_loading_to_the_parent(
    good: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the child (or a result that does not pickle) is not hidden: the parent loads
    in process, sees what it would have seen without the child, and says so."""

    def unpicklable(config: Any) -> Any:
        return lambda: config

    assert load_config_isolated(good, unpicklable)() == load_config(good)
    assert caplog.messages == [f"Configuration read in process: its child process failed "
                               f"file={good}"]  # fmt: skip

    def bug(config: Any) -> Any:
        raise RuntimeError("a bug in preparing")

    with pytest.raises(RuntimeError, match="a bug in preparing"):
        load_config_isolated(good, bug)
    # a fresh interpreter finds `prepare` by name: a local function is not found there
    with pytest.raises(RuntimeError, match="a bug in preparing"):
        load_config_isolated(good, bug, fresh_interpreter=True)


def test_the_fresh_interpreter_does_the_work(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the reload relies on: the file is read in the other process, not here."""

    def not_here(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("loaded in the parent")

    monkeypatch.setattr("edge_agent.config.loader.load_config", not_here)
    blueprint = load_config_isolated(good, Blueprint.of, fresh_interpreter=True)
    assert [s.name for s in blueprint.config.sources] == ["plc-1", "plc-2", "sim"]


def test_the_parent_never_holds_what_reading_the_file_takes(tmp_path: Path) -> None:
    """What the parent allocates while the child loads is the hand-off, not the YAML data and
    pydantic's models (10 devices of 1,000 points: in process, tens of MB at the peak)."""
    points = [{"name": f"r{a}", "register": "holding", "address": a, "type": "uint16"}
              for a in range(1000)]  # fmt: skip
    sources = [{"type": "modbus", "name": f"d{i}", "host": "h", "port": 1502 + i,
                "points": [dict(p) for p in points]} for i in range(10)]  # fmt: skip
    path = tmp_path / "big.yaml"
    write_keypair(tmp_path / "keys")
    signing = {"key_file": str(tmp_path / "keys" / "signing.key")}
    path.write_text(yaml.safe_dump({"gateway": {"id": "g"}, "signing": signing,
                                    "sources": sources}))  # fmt: skip
    peaks = []
    for in_child in (False, True):
        tracemalloc.start()
        try:
            if in_child:
                load_config_isolated(path, Blueprint.of)
            else:
                Blueprint.of(load_config(path))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    here, isolated = peaks
    assert isolated < here / 4, peaks


def test_run_refuses_an_invalid_file_with_check_configs_lines(tmp_path: Path) -> None:
    """`edge-agent run` on a bad file: exit 1 before anything starts (no buffer made), each
    problem logged as check-config prints it (FILE:LINE:COL: key.path: message)."""
    path = tmp_path / "bad.yaml"
    store = f"  max_bytes: lots\n  path: {tmp_path}/buffer.db\n"
    path.write_text(str(BAD["five mistakes"]).replace("  max_bytes: lots\n", store))
    check = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "-c", str(path), "--log-format", "text"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (check.returncode, run.returncode) == (1, 1), run.stderr
    problems = check.stderr.splitlines()[:-1]  # the last line counts them
    assert len(problems) == 5
    for line in problems:
        assert f"problem={line.strip()}" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "buffer.db").exists()


def large_config(tmp_path: Path) -> Path:
    """A valid file of 100,000 Modbus points (10 blocks): its child reads it in about a second."""
    write_keypair(tmp_path / "keys")
    sources = [{"type": "modbus", "name": f"d{i}", "host": "127.0.0.1", "port": 1,
                "points": [{"name": "r{address}", "register": "holding", "address": 0,
                            "type": "uint16", "count": 10_000}]} for i in range(10)]  # fmt: skip
    path = tmp_path / "large.yaml"
    path.write_text(yaml.safe_dump({
        "gateway": {"id": "g"}, "store": {"path": str(tmp_path / "buffer.db")},
        "signing": {"key_file": str(tmp_path / "keys" / "signing.key")}, "sources": sources,
    }))  # fmt: skip
    return path


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_the_child_reads_ends_both_processes(tmp_path: Path, stop: int) -> None:
    """SIGTERM or SIGINT to `edge-agent run` while its child reads a large file (100,000
    points): exit 0 (a clean stop, docs/contract.md §1), nothing started, no traceback, and the
    child ended with it. It once died of the SIGTERM and left the child reading on, orphaned."""
    path = large_config(tmp_path)
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "-c", str(path), "--log-format", "text"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        reader = forked_child(agent.pid, timeout=10)  # reading takes about a second
        agent.send_signal(stop)
        _, errors = agent.communicate(timeout=30)
    finally:
        agent.kill()
        agent.wait()
    assert agent.returncode == 0, errors
    assert not Path(f"/proc/{reader}").exists(), (Path(f"/proc/{reader}/stat").read_text(), errors)
    assert "Traceback" not in errors
    assert "Stopped while reading the configuration" in errors
    assert not (tmp_path / "buffer.db").exists()


def test_a_reload_while_the_child_reads_is_ignored_and_the_agent_starts(tmp_path: Path) -> None:
    """SIGHUP (`systemctl reload`) to `edge-agent run` while its child reads a large file: the
    reload is ignored and logged, the agent starts on the file it read, and a later SIGTERM
    stops it cleanly. SIGHUP's default action once ended the agent there."""
    path = large_config(tmp_path)
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "-c", str(path), "--log-format", "text"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    started = threading.Event()

    def read_log() -> None:
        assert agent.stderr is not None
        for line in agent.stderr:
            lines.append(line)
            if "Started gateway=" in line:
                started.set()

    reader_thread = threading.Thread(target=read_log, daemon=True)
    reader_thread.start()
    try:
        forked_child(agent.pid, timeout=10)  # reading takes about a second
        agent.send_signal(signal.SIGHUP)
        assert started.wait(60), "".join(lines)
        assert agent.poll() is None
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, "".join(lines)
    finally:
        agent.kill()
        agent.wait()
        reader_thread.join(10)
    log = "".join(lines)
    assert "Reload ignored: the agent is still starting" in log, log
    assert "Traceback" not in log, log


def noisy_blueprint(config: Any) -> Blueprint:
    """`Blueprint.of`, and a line on stdout, as a library might print at import or at work."""
    print("a line on stdout")
    return Blueprint.of(config)


def test_what_the_fresh_interpreter_prints_stays_out_of_its_outcome(
    good: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The reload's child hands its outcome back on a pipe of its own: what it prints to
    stdout goes where the agent's stdout goes and does not spoil the outcome. On stdout, it
    once made the bytes unreadable, and the file was read in process after all."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the child imports this file
    blueprint = load_config_isolated(good, noisy_blueprint, fresh_interpreter=True)
    assert [s.name for s in blueprint.config.sources] == ["plc-1", "plc-2", "sim"]
    assert "Configuration read in process" not in caplog.text
    assert "a line on stdout" in capfd.readouterr().out


def test_the_child_dies_with_the_agent_however_the_agent_dies(tmp_path: Path) -> None:
    """SIGKILL to `edge-agent run` (the OOM killer, say) while its child reads a large file:
    the kernel kills the child at once (PR_SET_PDEATHSIG), which once read on for no one and
    ended on its own (exit 70 when the pipe to the dead agent broke)."""
    path = large_config(tmp_path)
    command = [sys.executable, "-m", "edge_agent", "run", "-c", str(path)]
    watch = subprocess.run(
        [sys.executable, "-c", ORPHAN_WATCH, str(Path(__file__).parent), *command],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert watch.stdout.strip() == str(int(signal.SIGKILL)), watch
