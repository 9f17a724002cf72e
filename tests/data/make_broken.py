"""Regenerates tests/data/broken/: one small file per way an input can be broken.
Run from the repository root: .venv/bin/python tests/data/make_broken.py"""

import gzip
import io
import zipfile
from pathlib import Path

import pypdf
from salachat.ingest.synthetic_pdf import make_pdf

OUT = Path(__file__).parent / "broken"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    pdf = make_pdf([f"Page {n} of a report." for n in range(1, 4)], title="Report")
    (OUT / "truncated.pdf").write_bytes(pdf[: len(pdf) // 2])
    (OUT / "zero_bytes.txt").write_bytes(b"")
    (OUT / "binary_named.txt").write_bytes(gzip.compress(b"not text at all " * 20, mtime=0))
    (OUT / "invalid_utf8.md").write_bytes("# Café notes\n\nÜber alles.\n".encode() + b"broken \xc3\x28 here\n")
    (OUT / "not_a_pdf.pdf").write_bytes(b"<html><body>This was a web page saved as .pdf</body></html>\n")
    (OUT / "not_a_zip.epub").write_bytes(b"plain text pretending to be an e-book\n")
    start = pdf.rindex(b"<< /Length", 0, pdf.index(b"(Page 2 of a report.)"))
    (OUT / "damaged_page.pdf").write_bytes(pdf[:start] + b"<< /Filter /FlateDecode " + pdf[start + 3:])
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password="open sesame", owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    (OUT / "password.pdf").write_bytes(buffer.getvalue())
    docx = io.BytesIO()
    with zipfile.ZipFile(docx, "w") as archive:
        archive.writestr("word/document.xml", "<w:document/>")
    (OUT / "letter.docx").write_bytes(docx.getvalue())
    packed = gzip.compress("".join(f"line {n}\n" for n in range(2000)).encode(), mtime=0)
    (OUT / "truncated.txt.gz").write_bytes(packed[: len(packed) // 2])


if __name__ == "__main__":
    main()
