"""The installed `ffnscope` command in a real pseudo-terminal (pexpect), its output rendered by a
terminal emulator (pyte), driven by keys as a user over SSH would."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pexpect
import pyte
import pytest

from tests.conftest import env_for_subprocess

COLS, ROWS = 80, 24


def installed_command() -> str:
    found = shutil.which("ffnscope", path=str(Path(sys.executable).parent)) or shutil.which("ffnscope")
    if not found:
        pytest.fail("the ffnscope console script is not installed; run scripts/setup.sh (pip install -e .)")
    return found


class Terminal:
    def __init__(self, args: list[str], cwd: Path):
        env = env_for_subprocess()
        env.update(TERM="xterm-256color", COLUMNS=str(COLS), LINES=str(ROWS))
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(installed_command(), args, env=env, cwd=str(cwd), dimensions=(ROWS, COLS))

    def pump(self) -> None:
        while True:
            try:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.05))
            except pexpect.TIMEOUT:
                return
            except pexpect.EOF:
                return

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if needle in self.text():
                return self.text()
        raise AssertionError(f"'{needle}' never appeared; screen:\n{self.text()}")

    def send(self, keys: str) -> None:
        self.child.send(keys)


def test_installed_command_in_a_terminal(hostile_cache, tmp_path):
    term = Terminal(["tui", str(hostile_cache)], tmp_path)
    try:
        term.wait_for("Layers")
        screen = term.wait_for("alive freq")
        assert "layer" in screen and "dead %" in screen
        term.send("\r")  # enter: layer 0's neurons
        term.wait_for("Neurons (layer 0)")
        term.send("d")   # dead only
        screen = term.wait_for("filter: dead")
        assert "match" in screen
        term.send("\x1bOP")  # F1
        term.wait_for("this help")
        term.send("\x1b")
        time.sleep(0.3)
        term.send("q")
        term.child.expect(pexpect.EOF, timeout=30)
    finally:
        if term.child.isalive():
            term.child.terminate(force=True)
    term.child.close()
    assert term.child.exitstatus == 0, term.text()
    assert not any(p.name.endswith(".tmp") for p in hostile_cache.parent.iterdir())  # browsing writes nothing
