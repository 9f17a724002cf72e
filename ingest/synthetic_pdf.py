"""A minimal PDF writer for tests and the benchmark: pages of known text at known page numbers, with no
dependency beyond the standard library. Not for users' documents: one font, one column, ASCII only."""

from __future__ import annotations


def _escape(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[str | None], title: str | None = None) -> bytes:
    """PDF bytes with one page per item; None makes a page with no text layer (like a scanned image)."""
    objects: list[bytes] = []  # object i+1 is objects[i]
    page_ids = []
    font_id = 3
    objects.append(b"")  # 1: catalog, filled below
    objects.append(b"")  # 2: page tree, filled below
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for text in pages:
        if text is None:
            stream = b"0.5 g 72 72 468 648 re f"  # a grey box: marks on the page, but no text
        else:
            lines = text.split("\n")
            body = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
            stream = f"BT /F1 11 Tf 14 TL 72 760 Td {body} ET".encode("latin-1", errors="replace")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content_id = len(objects)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (content_id, font_id))
        page_ids.append(len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    kids = b" ".join(b"%d 0 R" % page_id for page_id in page_ids)
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(page_ids))
    info_id = None
    if title is not None:
        objects.append(b"<< /Title (%s) /Producer (salachat synthetic_pdf) >>" % _escape(title).encode("latin-1"))
        info_id = len(objects)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info = b" /Info %d 0 R" % info_id if info_id else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, info, xref_at)
    return bytes(out)
