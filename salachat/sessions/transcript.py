"""A session's transcript for people (Markdown) and programs (JSON): what was read, asked and answered."""

from __future__ import annotations

import json


def transcript_dict(name: str, manifest: dict) -> dict:
    return {
        "session": name,
        "model": manifest["model"]["id"],
        "created": manifest["created"],
        "updated": manifest["updated"],
        "tokens": manifest["tokens"],
        "documents": manifest["documents"],
        "reading_complete": manifest["conversation"]["pending_tokens"] == 0,
        "turns": [{"question": t["question"], "answer": t["answer"]} for t in manifest["conversation"]["turns"]],
    }


def transcript_json(name: str, manifest: dict) -> str:
    return json.dumps(transcript_dict(name, manifest), ensure_ascii=False, indent=2)


def transcript_markdown(name: str, manifest: dict) -> str:
    data = transcript_dict(name, manifest)
    lines = [f"# Session {name}", "", f"Model: `{data['model']}`  ", f"Updated: {data['updated']}  ",
             f"Context: {data['tokens']:,} tokens", "", "## Documents", ""]
    lines += [f"- {d.get('title') or d.get('source')} ({d.get('kind')}, `{d.get('source')}`)" for d in data["documents"]]
    if not data["reading_complete"]:
        lines += ["", "_Reading was interrupted; `salachat resume " + name + "` finishes it._"]
    for turn in data["turns"]:
        lines += ["", "## Q: " + turn["question"].strip().replace("\n", " "), "", turn["answer"].strip()]
    return "\n".join(lines) + "\n"


def export_transcript(path, text: str) -> None:
    """Write an exported transcript to `path`, private (0600: it quotes the documents) whatever the umask.
    A full disk, a missing folder or a place that cannot be written is one SessionSaveError line."""
    import errno
    import os
    import stat

    from salachat.sessions.manifest import FILE_MODE, SessionSaveError

    data = (text if text.endswith("\n") else text + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as e:
        hint = "free some space" if e.errno == errno.ENOSPC else "pick a folder you can write to"
        raise SessionSaveError(f"could not write the transcript to {path} ({e.strerror or e}): {hint}") from None
