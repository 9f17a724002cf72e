"""Rich consoles: answers on stdout, everything else (progress, diagnostics) on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error stays one line


def reading_progress(label: str = "reading") -> Progress:
    """A progress bar with tokens read, tokens/s and time left."""
    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
