"""Write sample.pdf from sample.txt: a minimal, dependency-free PDF writer (Helvetica, A4, word-wrapped).

Run `python assets/make_sample_pdf.py` to regenerate. The PDF is committed so users need nothing to try salachat.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

HERE = Path(__file__).parent
PAGE_W, PAGE_H, MARGIN, LEADING, SIZE = 595, 842, 64, 15, 11
LINES_PER_PAGE = (PAGE_H - 2 * MARGIN) // LEADING


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def layout(text: str) -> list[list[str]]:
    """Wrap paragraphs to lines; start every chapter on a new page so pages are citable units."""
    pages: list[list[str]] = [[]]
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip()
        if paragraph.startswith("Chapter") and pages[-1]:
            pages.append([])
        lines = textwrap.wrap(paragraph, 85) or [""]
        if len(pages[-1]) + len(lines) + 1 > LINES_PER_PAGE:
            pages.append([])
        pages[-1].extend(lines + [""])
    return pages


def write_pdf(pages: list[list[str]], title: str, out: Path) -> None:
    objects: list[bytes] = []

    def add(body: str | bytes) -> int:
        objects.append(body.encode("latin-1") if isinstance(body, str) else body)
        return len(objects)

    catalog = add("")  # filled in below, once the page ids are known
    pages_id = add("")
    font = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    page_ids = []
    for lines in pages:
        ops = ["BT", f"/F1 {SIZE} Tf", f"{LEADING} TL", f"{MARGIN} {PAGE_H - MARGIN} Td"]
        ops += [f"({escape(line)}) Tj T*" for line in lines]
        stream = "\n".join(ops + ["ET"]).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        page_ids.append(
            add(
                f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 {PAGE_W} {PAGE_H}] "
                f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {content} 0 R >>"
            )
        )
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R >>".encode()
    kids = " ".join(f"{i} 0 R" for i in page_ids)
    objects[pages_id - 1] = f"<< /Type /Pages /Kids [{kids}] /Count {len(page_ids)} >>".encode()
    info = add(f"<< /Title ({escape(title)}) /Producer (salachat make_sample_pdf.py) >>")

    out_bytes = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out_bytes))
        out_bytes += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out_bytes)
    out_bytes += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out_bytes += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out_bytes += b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, catalog, info, xref
    )
    out.write_bytes(bytes(out_bytes))


if __name__ == "__main__":
    text = (HERE / "sample.txt").read_text(encoding="utf-8")
    title = text.splitlines()[0]
    write_pdf(layout(text), title, HERE / "sample.pdf")
    print(f"wrote {HERE / 'sample.pdf'}")
