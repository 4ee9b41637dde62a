"""The frame every screen shares: a header saying what is open, a breadcrumb, the content and a
footer with the screen's verbs."""
from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from ffnscope.app.tui.cells import middle

FRAME_CSS = """
.title-bar { height: 1; background: $primary; color: $text; text-style: bold; }
.crumbs { height: 1; color: $text-muted; }
.status-line { height: 1; background: $boost; }
"""


# the footer's last key on screens with room for it (f1 works everywhere; its help lists ctrl+p too)
HELP_KEY = Binding("f1", "app.help", "help")


class SteadyFooter(Footer):
    """Textual's footer, rebuilt only when the keys it shows change. Textual rebuilds it (a dozen widgets
    and their CSS) whenever the screen's bindings may have changed, which is after every dialog closes:
    about two thirds of what a filter or sort picked in a dialog cost on the neurons screen."""

    _shown: tuple | None = None  # the keys of the last rebuild

    def bindings_changed(self, screen: Screen) -> None:
        shown = tuple((binding.key, binding.action, binding.description, enabled, tooltip)
                      for _, binding, enabled, tooltip in screen.active_bindings.values() if binding.show)
        if shown == self._shown and self._bindings_ready:
            return
        if screen.app.app_focus and self.is_attached and screen is self.screen:  # super() rebuilds
            self._shown = shown
        super().bindings_changed(screen)


class FramedScreen(Screen):
    HELP_TITLE = ""
    DEFAULT_CSS = FRAME_CSS
    BINDINGS = [Binding("escape", "back", "back", show=False)]
    _resumed = False  # shown on top before

    def _on_screen_resume(self, event: events.ScreenResume) -> None:
        """Textual restyles every widget of a screen whenever it comes on top; the first time it has just
        been mounted, styled (restyling the record form's 40 widgets again was 40% of opening it)."""
        if not self._resumed:
            self._resumed = True
            event.refresh_styles = False

    def frame_top(self) -> ComposeResult:
        yield Static(id="title-bar", classes="title-bar")
        yield Static(id="crumbs", classes="crumbs")

    def frame_bottom(self) -> ComposeResult:
        """The screen's verbs in one 80-column line: short labels, compact, no palette key (f1's
        help names ctrl+p and the long description of every key)."""
        yield SteadyFooter(compact=True, show_command_palette=False)

    def set_header(self, left: str, right: str = "", crumbs: str = "") -> None:
        """Untrusted parts must already be escaped (app.safe_text); nothing here is markup."""
        width = max(self.app.size.width, 20)
        room = max(width - len(right) - 2, 1)
        self.query_one("#title-bar", Static).update(Text(f" {left[:room]:<{room}}{right} "))
        # cut in the middle: the file name's start and the screen's own name at the end stay visible
        self.query_one("#crumbs", Static).update(Text(f" {middle(crumbs, width - 1).rstrip()}"))

    def rebind(self, rec) -> None:
        """Show a newer opening of the same recording (a job has replaced its file)."""
        self.rec = rec

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
