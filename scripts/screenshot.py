"""Make docs/screenshot.svg with the app itself: the sample PDF read, one question answered.

    .venv/bin/python scripts/screenshot.py
"""

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from salachat.tui.app import Options, SalaChat


async def main() -> None:
    app = SalaChat(Options(paths=[ROOT / "assets" / "sample.pdf"], max_tokens=48))
    async with app.run_test(size=(110, 30)) as pilot:
        await app.workers.wait_for_complete()
        app.query_one("#question").value = "Who kept the light for thirty-one years?"
        await pilot.press("enter")
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        path = app.save_screenshot(filename="screenshot.svg", path=str(ROOT / "docs"))
        print(f"wrote {path}")


asyncio.run(main())
