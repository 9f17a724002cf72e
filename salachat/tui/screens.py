"""The chat app's modal screens: saved sessions (open, rename, delete), a cited passage, a one-line prompt."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label, Static

from salachat.paths import sessions_dir
from salachat.sessions import SessionError, list_sessions, remove_session, rename_session, session_folder


class PromptScreen(ModalScreen[str | None]):
    """Asks for one line (a new session name); Escape gives None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str | Text, value: str = ""):
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text)
            yield Input(value=self.value, id="prompt-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question: y or Enter say yes, n or Escape no."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y,enter", "dismiss(True)", "Yes", priority=True),
        Binding("n,escape", "dismiss(False)", "No", priority=True),
    ]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.question), id="confirm-question")
            yield Label("y / Enter: yes    n / Esc: no")


class PassageScreen(ModalScreen[None]):
    """The text of a cited passage, with its source and anchor."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss", "Close"), Binding("q", "dismiss", "Close", show=False)]

    def __init__(self, passage):
        super().__init__()
        self.passage = passage

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text.assemble((self.passage.source, "bold"), f"  [{self.passage.anchor}]"), id="passage-title")
            with VerticalScroll():
                yield Static(self.passage.text, id="passage-text", markup=False)


class SessionsScreen(ModalScreen[str | None]):
    """Saved sessions, newest first. Enter opens one (dismissed with its name), r renames, d deletes."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("enter", "open", "Open", priority=True),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Saved sessions  (Enter open · r rename · d delete · Esc close)")
            yield DataTable(id="sessions-table", cursor_type="row")
            yield Static("", id="sessions-status")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("session", "tokens", "documents", "updated")
        self.refresh_rows()
        table.focus()

    def refresh_rows(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        for name, manifest, error in list_sessions(sessions_dir()):
            if manifest is None:
                table.add_row(Text(name), "-", Text(f"unreadable: {error}"), "", key=name)
                continue
            try:
                docs = ", ".join(str(d.get("source", "?")).rsplit("/", 1)[-1] for d in manifest.get("documents", []))
                tokens = f"{int(manifest.get('tokens', 0)):,}"
            except (TypeError, ValueError, AttributeError):  # a malformed manifest is one row, not a crash
                table.add_row(Text(name), "-", Text("unreadable: malformed manifest"), "", key=name)
                continue
            table.add_row(Text(name), tokens, Text(docs or "-"),
                          str(manifest.get("updated", ""))[:16].replace("T", " "), key=name)
        if not table.row_count:
            self.query_one("#sessions-status", Static).update("No saved sessions yet: `--session NAME` saves one.")

    def _selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_open(self) -> None:
        name = self._selected()
        if name is not None:
            self.dismiss(name)

    def action_delete(self) -> None:
        name = self._selected()
        if name is None:
            return
        try:
            remove_session(session_folder(sessions_dir(), name))
            self.query_one("#sessions-status", Static).update(Text(f"deleted {name}"))
        except SessionError as e:
            self.query_one("#sessions-status", Static).update(Text(str(e)))
        self.refresh_rows()

    def action_rename(self) -> None:
        old = self._selected()
        if old is None:
            return

        def done(new: str | None) -> None:
            if not new or new == old:
                return
            try:
                rename_session(sessions_dir(), old, new)
                self.query_one("#sessions-status", Static).update(Text(f"renamed {old} → {new}"))
            except SessionError as e:
                self.query_one("#sessions-status", Static).update(Text(str(e)))
            self.refresh_rows()

        self.app.push_screen(PromptScreen(Text(f"Rename {old} to:"), old), done)
