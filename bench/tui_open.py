"""How fast the TUI opens a big cache and answers filter and sort keys, and its memory; and how fast
the new-recording form opens.

    python -m tests.synthetic_cache /tmp/opt66b.h5          # OPT-66b's shape: 64 x 36,864 neurons
    python bench/tui_open.py /tmp/opt66b.h5                 # (or --generate: makes it first when missing)

Runs the real app headless (Textual's Pilot) at 80x24: start -> layers screen -> `a` (every
neuron of every layer) -> a usable neurons screen; then each key of a filter/sort session. A timed
key is posted to the app as a terminal would send it, and timed until the neurons screen holds the
new rows plus one full render of the visible table (Pilot's own press() waits ~70 ms per key for
the app to go idle, which a real terminal does not). Prints milliseconds and the process's memory.

Then, in a fresh process (`--form` alone: only that), the app opens on the recordings screen listing
the cache's folder and `n` opens the new-recording form, timed until the form shows its duration
estimate (from the newest complete recording of the default model there, if any) and one frame of it
is drawn. Record a small cache for it with `ffnscope record --model default --data builtin --tokens
4096 --seq-len 512 --out DIR/small.h5`."""
from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from textual import events  # noqa: E402

from ffnscope.app.tui.app import FFNScopeApp  # noqa: E402
from ffnscope.app.tui.layers import LayersScreen  # noqa: E402
from ffnscope.app.tui.modals import AskScreen, ChooseScreen  # noqa: E402
from ffnscope.app.tui.neurons import NeuronsScreen  # noqa: E402
from ffnscope.app.tui.recordings import RecordingsScreen  # noqa: E402
from ffnscope.app.tui.table import VirtualTable  # noqa: E402

# (what, keys before the timed key, the timed key(s)); choices in ChooseScreen are picked by id
SESSION = [
    ("dead only", [], ["d"]),
    ("alive only", [], ["d"]),
    ("any (dead filter off)", [], ["d"]),
    ("token detectors", ["t"], ["choose:token"]),
    ("trigram detectors", ["t"], ["choose:trigram"]),
    ("detector filter off", ["t"], ["choose:off"]),
    ("positional, any type", ["p"], ["choose:any"]),
    ("oscillatory, strong only", ["p"], ["choose:oscillatory+"]),
    ("positional off", ["p"], ["choose:off"]),
    ("firing frequency 0.1-5 %", ["f", *"0.1-5"], ["enter"]),
    ("MI >= 0.05", ["m", *"0.05-"], ["enter"]),
    ("clear filters", [], ["c"]),
    ("search triggers 'the'", ["slash", *"the"], ["enter"]),
    ("clear filters", [], ["c"]),
    ("sort by firing frequency (all rows)", ["s"], ["choose:fire_freq"]),
    ("reverse", [], ["r"]),
    ("sort by positional MI (all rows)", ["s"], ["choose:pos_mi"]),
    ("dead only, sorted by MI", [], ["d"]),
    ("sort by max activation", ["s"], ["choose:g_max"]),
    ("page down x10", [], ["pagedown"] * 10),
    ("end", [], ["end"]),
]


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def until(pilot, predicate, timeout=120.0):
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise TimeoutError
        await asyncio.sleep(0.002)


async def settled(pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def press(pilot, keys) -> None:
    """Untimed keys, through Pilot."""
    for key in keys:
        if key.startswith("choose:"):
            screen = pilot.app.screen
            assert isinstance(screen, ChooseScreen), screen
            ids = [v for v, _ in screen.choices]
            await pilot.press("home", *["down"] * ids.index(key[7:]))
        else:
            await pilot.press(key)


def post_key(app, key: str) -> None:
    """A key as the terminal driver delivers it."""
    char = {"enter": "\r", "pagedown": None, "end": None}.get(key, key)
    app.post_message(events.Key(key, char))


async def timed(pilot, screen: NeuronsScreen, keys: list[str]) -> float:
    """ms from posting `keys` until the rows they ask for are in and the table is drawn."""
    table = screen.query_one(VirtualTable)
    t0 = time.perf_counter()
    for key in keys:
        updates, cursor = screen.updates, table.cursor
        post_key(pilot.app, "enter" if key.startswith("choose:") else key)
        moves = key in ("pagedown", "end")
        await until(pilot, lambda: table.cursor != cursor if moves else screen.updates > updates)
    for y in range(table.size.height):  # one full draw of what is on screen
        table.render_line(y)
    return 1000 * (time.perf_counter() - t0)


async def main(path: Path, repeat: int) -> None:
    base, _ = rss_mib()
    start = time.perf_counter()
    app = FFNScopeApp([path], dirs=[])
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, LayersScreen))
        layers_s = time.perf_counter() - start
        post_key(app, "a")
        await until(pilot, lambda: isinstance(app.screen, NeuronsScreen) and app.screen.updates > 0)
        screen = app.screen
        table = screen.query_one(VirtualTable)
        for y in range(table.size.height):  # one full draw of what is on screen
            table.render_line(y)
        open_s = time.perf_counter() - start
        await settled(pilot)
        n = screen.index.n
        current, peak = rss_mib()
        print(f"{path.name}: {len(screen.index.layers)} layers x {screen.index.d_ffn:,} neurons = {n:,} rows")
        print(f"open -> layers screen {layers_s:.2f} s; -> neurons screen (all {n:,} rows) {open_s:.2f} s")
        print(f"memory: {current:.0f} MiB resident now ({current - base:.0f} MiB for the app and index), peak {peak:.0f} MiB")
        print(f"{'key':<40} {'ms':>8} {'rows':>12}")
        worst = 0.0
        for _ in range(repeat):
            for what, before, timed_keys in SESSION:
                await press(pilot, before)
                await settled(pilot)
                if before and before[0] in ("f", "m", "slash"):
                    assert isinstance(app.screen, AskScreen)
                if timed_keys[0].startswith("choose:"):
                    await press(pilot, timed_keys)  # move to the choice; the enter that picks it is timed
                ms = await timed(pilot, screen, timed_keys)
                await settled(pilot)
                worst = max(worst, ms)
                print(f"{what:<40} {ms:8.1f} {len(screen.rows):>12,}")
        current, peak = rss_mib()
        print(f"slowest key {worst:.0f} ms; memory after the session {current:.0f} MiB, peak {peak:.0f} MiB")


async def form(folder: Path) -> None:
    """The recordings screen listing `folder`, then `n`: ms until the form's estimate is in and drawn."""
    app = FFNScopeApp([], dirs=[folder])
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RecordingsScreen) and app.screen.rows)
        await settled(pilot)  # the list's scan done
        listed = len(app.screen.rows)
        t0 = time.perf_counter()
        post_key(app, "n")
        await until(pilot, lambda: getattr(app.screen, "recordings", None) is not None)  # the form read the catalog
        app.screen._on_timer_update()  # one frame of the form, drawn as Pilot's pause() draws it
        ms = 1000 * (time.perf_counter() - t0)
        estimate = str(app.screen.query_one("#estimate").render())
        print(f"new-recording form (n), {listed} recording(s) in {folder}: {ms:.1f} ms to its estimate, drawn "
              f"({estimate[:60]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--repeat", type=int, default=1, help="run the key session this many times")
    parser.add_argument("--form", action="store_true", help="time only the new-recording form (`n`)")
    parser.add_argument("--generate", action="store_true",
                        help="if CACHE is missing, first write it: the synthetic OPT-66b-shaped cache of "
                             "tests/synthetic_cache.py")
    args = parser.parse_args()
    if args.generate and not args.cache.exists():
        from tests.synthetic_cache import main as generate_cache

        if generate_cache([str(args.cache)]) not in (0, 1):  # 1: generated, with planted/found differences
            sys.exit(2)
    if args.form:
        asyncio.run(form(args.cache.absolute().parent))
    else:
        asyncio.run(main(args.cache, args.repeat))
        sys.stdout.flush()  # the form in a fresh process, as a first `n` finds it: its modules not imported yet
        subprocess.run([sys.executable, *sys.orig_argv[1:], "--form"], check=True)
