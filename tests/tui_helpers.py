"""Driving the Textual app in tests: wait for workers and screens, read the screen as text."""
from __future__ import annotations

import asyncio
import io
import time

from rich.console import Console


async def settle(pilot) -> None:
    """Let workers finish and the screen catch up."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


async def wait_for(pilot, predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{screen_text(pilot.app)}")
        await asyncio.sleep(0.05)
        await pilot.pause()


async def wait_screen(pilot, cls, timeout: float = 30.0):
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, cls), timeout, cls.__name__)
    await settle(pilot)
    return pilot.app.screen


def screen_text(app) -> str:
    """What the terminal shows, as plain text (styles dropped)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system=None,
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def raw_screen(app) -> str:
    """The screen as the terminal would receive it, escapes and all."""
    width, height = app.size
    out = io.StringIO()
    console = Console(width=width, height=height, file=out, force_terminal=True, color_system="truecolor",
                      legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return out.getvalue()
