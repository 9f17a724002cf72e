"""A corpus of malformed, hostile and unusual inputs, generated here, each read in process: a Document
when the input is fine (checked for the right text), otherwise one IngestError of the right kind whose
message is one line naming the file and the next step; nothing else escapes, and nothing takes long.
A representative dozen also go through the real `salachat ingest` entry point."""

from __future__ import annotations

import codecs
import gzip
import io
import os
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pypdf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from salachat.ingest import (
    BadEncoding,
    Binary,
    Damaged,
    Empty,
    IngestError,
    NotFound,
    Protected,
    TooLarge,
    Unexpected,
    Unsupported,
    find_passage,
    plan_paths,
    read_paths,
    render_prompt,
)
from salachat.ingest.synthetic_pdf import make_pdf

ROOT = Path(__file__).resolve().parent.parent
GPL3 = Path("/usr/share/common-licenses/GPL-3")  # base-files: a real text on every Debian system
# Built at run time so that this file itself never looks like it holds a key or a token.
PRIVATE_KEY = "-----BEGIN " + "OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
TOKEN = "gh" + "p_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
SECONDS = 10  # no input of the corpus may take longer than this to read or refuse


def _gpl() -> str:
    if GPL3.exists():
        return GPL3.read_text()
    return "GNU GENERAL PUBLIC LICENSE\nVersion 3, 29 June 2007\n\n" + "Everyone is permitted to copy.\n" * 200


def _epub(path: Path, chapters: list[bytes], *, opf: bytes | None = None, container: bool = True,
          extra: dict[str, bytes] | None = None, spine: list[int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as book:
        book.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        if container:
            book.writestr("META-INF/container.xml", (
                '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:'
                'container"><rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/'
                'oebps-package+xml"/></rootfiles></container>'))
        items = "".join(f'<item id="c{n}" href="ch{n}.xhtml" media-type="application/xhtml+xml"/>'
                        for n in range(len(chapters)))
        order = spine if spine is not None else list(range(len(chapters)))
        refs = "".join(f'<itemref idref="c{n}"/>' for n in order)
        book.writestr("OEBPS/content.opf", opf if opf is not None else (
            '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0"><metadata '
            'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>Test Book</dc:title></metadata>'
            f"<manifest>{items}</manifest><spine>{refs}</spine></package>").encode())
        for n, chapter in enumerate(chapters):
            book.writestr(f"OEBPS/ch{n}.xhtml", chapter)
        for name, data in (extra or {}).items():
            book.writestr(name, data)
    return path


def _xhtml(body: str, encoding: str = "utf-8", declare: str | None = "xml") -> bytes:
    head = f'<?xml version="1.0" encoding="{encoding}"?>' if declare == "xml" else ""
    meta = f'<meta charset="{encoding}"/>' if declare == "meta" else ""
    return (f'{head}<html xmlns="http://www.w3.org/1999/xhtml"><head>{meta}<title>t</title></head>'
            f"<body><h1>Chapter</h1><p>{body}</p></body></html>").encode(encoding)


def _encrypted_pdf(password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(["classified text"]))))
    writer.encrypt(user_password=password, owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def _gzip_of_repeated(byte: bytes, size: int) -> bytes:
    """A gzip member of `size` repeated bytes, built a megabyte at a time (a bomb in kilobytes)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = byte * (1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()


def _tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


@dataclass
class Case:
    name: str
    build: Callable[[Path], Path]  # writes the input under a folder, returns the path to read
    error: type[IngestError] | None = None  # None: reads fine
    says: str = ""  # in the message (error) or in the text (fine)
    max_tokens: int | None = None


def _file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data() if callable(data) else data)
        return path
    return build


def _made(make: Callable[[Path], Path]) -> Callable[[Path], Path]:
    return make


PDF = make_pdf([f"Page {n} of a report about lighthouses." for n in range(1, 4)], title="Report")
LATIN1 = "Là où naît l'été, le garçon dit: déjà vu, naïve café, Größe und Übermaß."
CYRILLIC = "Привет, как дела? Это обычный русский текст для проверки кодировки."


def _symlink_loop(folder: Path) -> Path:
    (folder / "a.txt").symlink_to(folder / "b.txt")
    (folder / "b.txt").symlink_to(folder / "a.txt")
    return folder / "a.txt"


def _fifo(folder: Path) -> Path:
    os.mkfifo(folder / "pipe.txt")
    return folder / "pipe.txt"


def _repo_fifo(folder: Path) -> Path:
    root = _tree(folder / "repo", {"main.py": "print('hello from main')\n"})
    os.mkfifo(root / "pipe.py")
    return root


def _repo_loop(folder: Path) -> Path:
    root = _tree(folder / "repo", {"main.py": "x = 'loop test'\n", "sub/inner.py": "y = 2\n"})
    (root / "sub" / "back").symlink_to(root)
    (root / "l1").symlink_to(root / "l2")
    (root / "l2").symlink_to(root / "l1")
    return root


SECRETS = {
    ".env": "TOKEN=abc\n", ".env.local": "DB_PASSWORD=hunter2\n", ".env.production": "API_KEY=xyz\n",
    ".env.staging": "A=b\n", ".git-credentials": "https://user:pw@example.com\n",
    ".npmrc": "//registry.npmjs.org/:_authToken=abc\n", ".pypirc": "[pypi]\npassword = pw\n",
    ".aws/credentials": "[default]\naws_access_key_id = x\n", ".pgpass": "localhost:5432:*:u:pw\n",
    ".netrc": "machine example.com login u password pw\n", ".ssh/id_ecdsa": PRIVATE_KEY,
    ".ssh/id_ed25519": PRIVATE_KEY, "deploy/id_rsa": PRIVATE_KEY, "kubeconfig": "apiVersion: v1\n",
    ".kube/config": "apiVersion: v1\n", "certs/server.pem": "x\n", "certs/server.key": "x\n",
    ".docker/config.json": '{"auths": {}}\n', "client_secret_123.json": "{}\n",
    "config/settings.txt": "the key follows\n" + PRIVATE_KEY, "app/tokens.py": f"TOKEN = '{TOKEN}'\n",
}
JUNK = {
    "assets/logo.svg": '<svg xmlns="http://www.w3.org/2000/svg"><path d="M0 0L10 10"/></svg>\n',
    "dist2/app.min.js": "var a=1;" * 300 + "\n", "static/bundle.js": ("function f(){return 1};" * 100 + "\n") * 3,
    "package-lock.json": "{}\n", "yarn.lock": "# yarn\n", "Cargo.lock": "# cargo\n", "poetry.lock": "# p\n",
    "uv.lock": "version = 1\n", "Gemfile.lock": "GEM\n", "data/late_nul.py": "x = 1\n" * 1500 + "\x00" * 4096,
}


def _repo_secrets(folder: Path) -> Path:
    return _tree(folder / "repo", {"README.md": "# Tool\n\nThe repository readme.\n", **SECRETS, **JUNK})


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _laughs() -> bytes:
    entities = '<!ENTITY a0 "ha">' + "".join(f'<!ENTITY a{n} "{f"&a{n - 1};" * 10}">' for n in range(1, 10))
    return (f'<?xml version="1.0"?><!DOCTYPE package [{entities}]><package><metadata><title>&a9;</title>'
            "</metadata></package>").encode()


def _encrypted_member(path: Path) -> Path:
    _epub(path, [_xhtml("hidden")])
    data = bytearray(path.read_bytes())
    # Set the "encrypted" flag of the chapter in both its local header and its central-directory entry.
    name = b"OEBPS/ch0.xhtml"
    for signature, flag_offset, name_offset in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_offset:start + name_offset + len(name)] == name:
                data[start + flag_offset] |= 1
            start += 4
    path.write_bytes(bytes(data))
    return path


def _pdf_bomb(path: Path) -> Path:
    """A one-page PDF whose content stream inflates from 250 KB to 100 MB."""
    from pypdf.generic import NameObject, StreamObject

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(["hello"]))))
    packer = zlib.compressobj(9)
    stream = StreamObject()
    stream._data = b"".join(packer.compress(b"BT /F1 11 Tf (x) Tj ET\n" * 45_000) for _ in range(100))
    stream._data += packer.flush()
    stream[NameObject("/Filter")] = NameObject("/FlateDecode")
    writer.pages[0][NameObject("/Contents")] = writer._add_object(stream)
    with path.open("wb") as handle:
        writer.write(handle)
    return path


def _copy(source: Path, folder: Path) -> Path:
    if not source.exists():
        pytest.skip(f"{source} is missing: run `apt-get install -y bzip2-doc`")
    target = folder / source.name
    target.write_bytes(source.read_bytes())
    return target


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


CASES = [
    # PDFs
    Case("pdf_ok", _file("report.pdf", PDF), says="Page 2 of a report about lighthouses."),
    Case("pdf_truncated_half", _file("t.pdf", PDF[: len(PDF) // 2]), Damaged, "is damaged or not a valid PDF"),
    Case("pdf_truncated_header_only", _file("h.pdf", b"%PDF-1.7\n"), Damaged, "is damaged or not a valid PDF"),
    Case("pdf_garbage_after_header", _file("g.pdf", b"%PDF-1.4\n" + os.urandom(20_000)), Damaged, "PDF"),
    Case("pdf_not_a_pdf", _file("n.pdf", b"<html>saved web page</html>"), Damaged, "is not a PDF"),
    Case("pdf_password", _file("locked.pdf", _encrypted_pdf("s3cret")), Protected, "is password-protected"),
    Case("pdf_xref_smashed", _file("x.pdf", PDF.replace(b"xref", b"xxxx")), Damaged, "startxref not found"),
    Case("pdf_no_text", _file("scan.pdf", make_pdf([None, None])), Empty, "has no text layer"),
    Case("pdf_named_txt", _file("report.txt", PDF), None, "Page 3 of a report"),  # read by its magic bytes
    Case("pdf_offsets_shifted", _file("r.pdf", PDF[:9] + b"% padding\n" + PDF[9:]), None,
         "Page 1 of a report"),  # pypdf recovers, and logs "incorrect startxref pointer": never on stderr
    Case("pdf_nul_stuffed", _file("z.pdf", PDF[:400] + b"\x00" * 50_000 + PDF[400:]), Damaged, "Root object"),
    Case("pdf_too_long", _file("long.pdf", make_pdf(["word " * 400] * 30)), TooLarge, "is too long to read",
         max_tokens=2_000),
    Case("pdf_gz_ok", _file("report.pdf.gz", gzip.compress(PDF)), None, "Page 2 of a report"),
    Case("pdf_flate_bomb", _made(lambda f: _pdf_bomb(f / "bomb.pdf")), Damaged, "Limit reached while decompressing"),
    # gzip
    Case("gz_truncated", _file("t.txt.gz", gzip.compress(os.urandom(3000).hex().encode())[:3000]), Damaged,
         "is not a valid gzip file"),
    Case("gz_bomb", _file("bomb.txt.gz", lambda: _gzip_of_repeated(b"a", 64 << 20)), TooLarge,
         "is too long to read"),
    Case("gz_nul_bomb", _file("nul.txt.gz", lambda: _gzip_of_repeated(b"\x00", 16 << 20)), Binary, "binary"),
    Case("gz_empty", _file("e.txt.gz", gzip.compress(b"")), Empty, "decompresses to 0 bytes"),
    Case("gz_not_gzip", _file("f.txt.gz", b"plain text named .gz\n"), Damaged, "is not a valid gzip file"),
    Case("gz_of_gz", _file("double.txt.gz", gzip.compress(gzip.compress(b"text " * 100))), Binary, "binary"),
    Case("gz_text_ok", _file("notes.md.gz", gzip.compress(b"# Notes\n\nKeep the light burning.\n")), None,
         "Keep the light burning."),
    # EPUBs
    Case("epub_not_zip", _file("n.epub", b"not a zip at all"), Damaged, "is not a zip archive"),
    Case("epub_truncated", _made(lambda f: _truncate(_epub(f / "t.epub", [_xhtml("text " * 2000)]))), Damaged,
         "is not a valid EPUB"),
    Case("epub_no_package", _file("e.epub", _zip({"mimetype": b"application/epub+zip"})), Damaged,
         "no META-INF/container.xml or .opf package"),
    Case("epub_bad_opf_xml", _made(lambda f: _epub(f / "b.epub", [_xhtml("x")], opf=b"<package><manifest>")),
         Damaged, "content.opf"),
    Case("epub_missing_chapters", _made(lambda f: _epub(f / "m.epub", [], opf=(
        b'<package xmlns="http://www.idpf.org/2007/opf"><manifest><item id="a" href="gone.xhtml"/></manifest>'
        b'<spine><itemref idref="a"/></spine></package>'))), Empty, "has no readable text in its chapters"),
    Case("epub_chapter_bomb", _made(lambda f: _epub(f / "bomb.epub", [b"<p>" + b" " * (40 << 20) + b"</p>"])),
         TooLarge, "decompresses to more than"),
    Case("epub_billion_laughs", _made(lambda f: _epub(f / "laughs.epub", [_xhtml("x")], opf=_laughs())),
         Damaged, "is not a valid EPUB"),
    Case("epub_latin1_declared", _made(lambda f: _epub(f / "l.epub", [_xhtml(LATIN1, "iso-8859-1")])), None,
         LATIN1),
    Case("epub_cp1252_meta", _made(lambda f: _epub(f / "w.epub", [_xhtml(LATIN1 + " “quoted”", "windows-1252",
                                                                        "meta")])), None, "“quoted”"),
    Case("epub_utf16_bom", _made(lambda f: _epub(f / "u16.epub", [codecs.BOM_UTF16_LE + _xhtml(
        CYRILLIC, "utf-16-le")])), None, CYRILLIC),
    Case("epub_utf16_declared_no_bom", _made(lambda f: _epub(f / "u16b.epub", [_xhtml(CYRILLIC, "utf-16-be")])),
         None, CYRILLIC),
    Case("epub_undeclared_cp1251", _made(lambda f: _epub(f / "ru.epub", [_xhtml(CYRILLIC, "cp1251", None)])),
         None, CYRILLIC),
    Case("epub_images_only", _made(lambda f: _epub(f / "img.epub", [b"<html><body><img src='a.png'/></body></html>"])), Empty, "no readable text"),
    Case("epub_drm", _made(lambda f: _epub(f / "drm.epub", [_xhtml("secret")], extra={
        "META-INF/encryption.xml": b'<encryption xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:Cipher'
                                   b'Reference URI="OEBPS/ch0.xhtml"/></encryption>'})), Protected, "DRM"),
    Case("epub_repeated_spine", _made(lambda f: _epub(f / "rep.epub", [_xhtml("Once only.")], spine=[0] * 500)),
         None, "Once only."),
    Case("epub_encrypted_member", _made(lambda f: _encrypted_member(f / "enc.epub")), Protected, "encrypted"),
    # Plain text
    Case("txt_empty", _file("e.txt", b""), Empty, "is empty (0 bytes)"),
    Case("txt_whitespace", _file("w.txt", b"  \n\t\n   \n" * 50), Empty, "has no text (only whitespace)"),
    Case("txt_bom_only", _file("bom.txt", codecs.BOM_UTF8), Empty, "has no text"),
    Case("txt_nul_after_9k", _file("n.txt", b"real words here\n" * 600 + b"\x00" * (1 << 20)), Binary,
         "contains binary data"),
    Case("txt_nul_after_3mb", _file("late.txt", lambda: b"line of text\n" * 250_000 + b"\x00" * 1000), Binary,
         "contains binary data"),
    Case("txt_single_nul", _file("one.txt", b"hello\n" * 100 + b"\x00" + b"world\n"), Binary, "binary"),
    Case("txt_controls_mid", _file("c.txt", b"text\n" * 3000 + bytes(range(1, 8)) * 400), Binary, "binary"),
    Case("txt_bad_utf8_after_2mb", _file("bad.txt", lambda: "café\n".encode() * 450_000 + b"\xff oops\n"),
         BadEncoding, "is not valid UTF-8 text (bad byte 0xff at line 450001"),
    Case("txt_random_bytes", _file("r.txt", lambda: os.urandom(100_000)), Binary, "binary"),
    Case("txt_truncated_utf8", _file("cut.txt", "naïve café ".encode() * 10 + "é".encode()[:1]), BadEncoding,
         "is not valid UTF-8"),
    Case("txt_utf16le", _file("u.txt", codecs.BOM_UTF16_LE + CYRILLIC.encode("utf-16-le")), None, CYRILLIC),
    Case("txt_utf16be_long", _file("u2.txt", lambda: codecs.BOM_UTF16_BE + (CYRILLIC + "\n").encode(
        "utf-16-be") * 20_000), None, CYRILLIC),
    Case("txt_utf32", _file("u32.txt", codecs.BOM_UTF32_LE + "Größe ≠ size".encode("utf-32-le")), None,
         "Größe ≠ size"),
    Case("txt_latin1", _file("fr.txt", LATIN1.encode("cp1252")), None, LATIN1),
    Case("txt_latin1_after_2mb_of_ascii", _file("late.txt", lambda: (("plain ascii line\n" * 130_000) + (LATIN1 + "\n")
                                                                    * 100).encode("cp1252")), None, LATIN1),
    Case("txt_utf8_then_bad_byte_after_2mb", _file("mixed.txt", lambda: b"ascii\n" * 400_000 + "naïve ".encode()
                                                   + b"\xff\n"), BadEncoding, "is not valid UTF-8 text (bad byte 0xff"),
    Case("txt_huge_line", _file("line.txt", lambda: b"word " * 1_000_000), None, "word word"),
    Case("txt_crlf", _file("crlf.txt", b"first\r\nsecond\r\nthird\r\n"), None, "second\nthird"),
    Case("txt_markup_in_text", _file("m.txt", b"[/x] [bold]not markup[/bold] [p.12]\n"), None, "[/x] [bold]"),
    Case("txt_too_long_refused_early", _file("big.txt", lambda: b"some words of text\n" * 3_000_000), TooLarge,
         "about 14,250,000 tokens, more than the 100,000 tokens", max_tokens=100_000),
    Case("txt_real_gpl", _file("GPL-3", lambda: _gpl().encode()), None, "GNU GENERAL PUBLIC LICENSE"),
    # HTML
    Case("html_meta_latin1", _file("l.html", f'<html><head><meta charset="iso-8859-1"></head><body><p>{LATIN1}'
                                             "</p></body></html>".encode("latin-1")), None, LATIN1),
    Case("html_meta_cp1251", _file("ru.html", ('<meta http-equiv="Content-Type" content="text/html; charset='
                                               f'windows-1251"><p>{CYRILLIC}</p>').encode("cp1251")), None, CYRILLIC),
    Case("html_utf16_xml", _file("u.xhtml", _xhtml(CYRILLIC, "utf-16-le")), None, CYRILLIC),
    Case("html_only_markup", _file("e.html", b"<html><head><title>T</title><script>var x;</script></head>"
                                             b"<body><div><img src=a.png></div></body></html>"), Empty, "no text"),
    Case("html_garbage_tags", _file("g.html", b"<<<>>><p <a href=<b>>text survives</b></p></div></div>"), None,
         "text survives"),
    Case("html_huge_title", _file("t.html", lambda: b"<title>" + b"T" * 2_000_000 + b"</title><p>body</p>"), None,
         "body"),
    Case("html_deep_nesting", _file("d.html", lambda: b"<div>" * 100_000 + b"deep" + b"</div>" * 100_000), None,
         "deep"),
    Case("html_unclosed_comment", _file("c.html", lambda: b"<p>before</p><!-- " + b"x" * 3_000_000), None,
         "before"),
    Case("html_nul", _file("n.html", b"<p>text</p>" * 1000 + b"\x00" * 5000), Binary, "binary"),
    Case("html_lying_meta", _file("lie.html", f'<meta charset="utf-8"><p>{LATIN1}</p>'.encode("cp1252")), None,
         LATIN1),
    Case("html_bzip2_manual", _made(lambda f: _copy(Path("/usr/share/doc/bzip2/manual.html"), f)), None,
         "Burrows-Wheeler"),
    # Markdown, code, other names
    Case("md_whitespace", _file("e.md", b"\n\n   \n"), Empty, "has no text"),
    Case("py_with_nul", _file("x.py", b"x = 1\n" * 10 + b"\x00\x00\x00"), Binary, "binary"),
    Case("py_one_long_line", _file("long.py", lambda: b"x = [" + b"1, " * 300_000 + b"]\n"), None, "x = [1, 1"),
    Case("docx_unsupported", _file("letter.docx", _zip({"word/document.xml": b"<w:document/>"})), Unsupported,
         ".docx files are not supported"),
    Case("extensionless_binary", _file("blob", bytes(range(256)) * 10), Unsupported,
         "binary files without an extension are not supported"),
    Case("name_with_markup", _file("[bold]notes[x].txt", b"plain words\n"), None, "plain words"),
    Case("name_with_newline", _file("two\nlines.txt", b"text in an odd name\n"), None, "odd name"),
    # Paths that are not files
    Case("missing", lambda f: f / "nowhere.pdf", NotFound, "no such file or folder"),
    Case("symlink_loop", _symlink_loop, NotFound, "cannot be opened"),
    Case("dangling_symlink", _made(lambda f: _link(f / "d.txt", f / "gone.txt")), NotFound,
         "no such file or folder"),
    Case("fifo", _fifo, Unsupported, "is not a regular file or folder"),
    Case("char_device", lambda f: Path("/dev/zero"), Unsupported, "is not a regular file or folder"),
    # Repositories
    Case("repo_secrets_and_junk", _repo_secrets, None, "The repository readme."),
    Case("repo_fifo", _repo_fifo, None, "hello from main"),
    Case("repo_symlink_loops", _repo_loop, None, "loop test"),
    Case("repo_bad_gitignore", _made(lambda f: _tree(f / "g", {".gitignore": "!\n\\\n[z-a]\n[[a]\n*.log\n", "a.log": "x\n",
                                                               "main.py": "x = 'kept'\n"})), None, "kept"),
    Case("repo_empty", _made(lambda f: _mkdir(f / "empty")), Empty, "the folder is empty"),
    Case("repo_only_secrets", _made(lambda f: _tree(f / "s", {".env": "A=1\n", "id_rsa": PRIVATE_KEY})), Empty,
         "looks like a credential"),
    Case("repo_too_long", _made(lambda f: _tree(f / "big", {f"m{n}.py": "x = 1\n" * 4000 for n in range(20)})),
         TooLarge, "is too long to read", max_tokens=20_000),
]


def test_the_corpus_is_large():
    assert len(CASES) >= 70 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_hostile_input_reads_right_or_fails_in_one_line(case, tmp_path, capfd):
    path = case.build(tmp_path)
    started = time.perf_counter()
    try:
        docs = read_paths([path], max_tokens=case.max_tokens)
    except IngestError as error:
        seconds = time.perf_counter() - started
        message = str(error)
        assert case.error is not None, f"refused a fine input: {message}"
        assert isinstance(error, case.error), (type(error).__name__, message)
        assert case.says in message, message
        assert "\n" not in message and "Traceback" not in message and "; " in message
        assert message.startswith(" ".join(str(path).split()))
    else:
        seconds = time.perf_counter() - started
        assert case.error is None, f"read although it should fail with {case.error.__name__}"
        text = "\n".join(segment.text for doc in docs for segment in doc.segments)
        assert case.says in text
        assert "\ufffd" not in text  # never a replacement character: decoded right, or refused
        render_prompt(docs)
    assert seconds < SECONDS
    assert capfd.readouterr().err == ""  # no library's warnings or log lines on the terminal


def test_secrets_and_junk_in_a_repository_are_listed_with_their_reasons(tmp_path):
    doc = read_paths([_repo_secrets(tmp_path)])[0]
    assert [segment.path for segment in doc.segments] == ["README.md"]
    reasons = {item.path: item.reason for item in doc.skipped}
    for path in SECRETS:
        folder = path.split("/")[0]
        if folder in (".ssh", ".aws"):
            assert reasons[folder + "/"] == "looks like a credential"
        else:
            assert reasons[path].startswith("looks like a credential"), (path, reasons.get(path))
    prompt = render_prompt([doc])
    assert "PRIVATE KEY" not in prompt and TOKEN not in prompt and "hunter2" not in prompt
    assert reasons["assets/logo.svg"] == "image (.svg markup, nothing to read)"
    assert reasons["dist2/app.min.js"] == "minified or generated bundle"
    assert reasons["static/bundle.js"].startswith("minified or generated (a line of")
    for lock in ("package-lock.json", "yarn.lock", "Cargo.lock", "poetry.lock", "uv.lock", "Gemfile.lock"):
        assert reasons[lock] == "lock file (generated)"
    assert reasons["data/late_nul.py"] == "binary (NUL or control bytes)"


def test_fifos_and_symlink_loops_inside_a_repository_are_skipped_not_waited_on(tmp_path):
    doc = read_paths([_repo_fifo(tmp_path)])[0]
    assert {item.path: item.reason for item in doc.skipped}["pipe.py"].startswith("not a regular file")
    loops = read_paths([_repo_loop(tmp_path / "other")])[0]
    reasons = {item.path: item.reason for item in loops.skipped}
    assert reasons["l1"] == reasons["l2"] == "broken symbolic link"
    assert reasons["sub/back"].startswith("symbolic link to a folder")


def test_declared_encodings_give_the_same_book_as_utf8(tmp_path):
    """The same chapters stored as UTF-8, Latin-1 (declared), UTF-16 (BOM) read to identical text."""
    body = LATIN1
    books = [_epub(tmp_path / "a.epub", [_xhtml(body, "utf-8")]),
             _epub(tmp_path / "b.epub", [_xhtml(body, "iso-8859-1")]),
             _epub(tmp_path / "c.epub", [codecs.BOM_UTF16_LE + _xhtml(body, "utf-16-le")])]
    texts = [read_paths([book])[0].segments[0].text for book in books]
    assert texts[0] == texts[1] == texts[2] and body in texts[0]


def test_too_long_text_is_refused_after_reading_only_its_start(tmp_path, monkeypatch):
    from salachat.ingest import stream

    path = tmp_path / "big.txt"
    path.write_bytes(b"some words of text\n" * 3_000_000)  # 57 MB
    read = []
    real_chunks = stream.Input.chunks

    def counting(self, size=stream.CHUNK_BYTES):
        for chunk in real_chunks(self, size):
            read.append(len(chunk))
            yield chunk

    monkeypatch.setattr(stream.Input, "chunks", counting)
    with pytest.raises(TooLarge) as caught:
        read_paths([path], max_tokens=1_000_000)
    assert sum(read) <= 6 << 20  # 4 MB of text is a million tokens: refused within the next chunk
    assert caught.value.limit == 1_000_000 and caught.value.size_bytes == path.stat().st_size
    assert abs(caught.value.tokens - path.stat().st_size // 4) < path.stat().st_size // 40


def test_decompressed_size_is_capped_whatever_the_token_limit(tmp_path, monkeypatch):
    from salachat.ingest import stream

    monkeypatch.setattr(stream, "MAX_INPUT_BYTES", 8 << 20)
    path = tmp_path / "spaces.txt.gz"
    path.write_bytes(_gzip_of_repeated(b" ", 16 << 20))  # spaces: few tokens, many bytes
    with pytest.raises(TooLarge, match="decompresses to more than 8.4 MB"):
        read_paths([path])


def test_sparse_anchors_cost_fewer_tokens_and_every_line_is_still_found(tmp_path):
    from salachat.ingest import estimate_tokens

    root = Path(pypdf.__file__).parent  # a real package: pypdf's own sources
    doc = read_paths([root], max_tokens=10_000_000)[0]
    prompt = render_prompt([doc])
    every_line = sum(len(seg.text.split("\n")) for seg in doc.segments)
    numbered = sum(1 for line in prompt.split("\n") if line[:1].isdigit() and "| " in line[:9])
    assert numbered < every_line / 3
    plain = "\n".join(f"### {seg.path}\n{seg.text}" for seg in doc.segments)
    old = "\n".join(f"### {seg.path}\n" + "\n".join(f"{n}| {line}" for n, line in enumerate(seg.text.split("\n"), 1))
                    for seg in doc.segments)
    assert estimate_tokens(prompt) - estimate_tokens(plain) < (estimate_tokens(old) - estimate_tokens(plain)) / 3
    segment = next(seg for seg in doc.segments if seg.path.endswith("_reader.py"))
    lines = segment.text.split("\n")
    for number in (1, 17, 100, len(lines)):
        assert find_passage([doc], f"{segment.path}:{number}", context_lines=0).text == lines[number - 1]


def test_plan_lists_files_skips_and_anchors_and_refuses_before_reading(tmp_path):
    root = _repo_secrets(tmp_path)
    big = tmp_path / "big.txt"
    big.write_bytes(b"some words of text\n" * 1_000_000)
    plan = plan_paths([root, big, tmp_path / "missing.txt"], max_tokens=1_000_000)
    repo, text, missing = plan.items
    assert [file.path for file in repo.files] == [
        "README.md", "app/tokens.py", "config/settings.txt", "data/late_nul.py", "static/bundle.js"]
    assert {item.path: item.reason for item in repo.skipped}[".env.local"] == "looks like a credential"
    assert repo.anchors[0] == "README.md:1" and text.anchors == ["big.txt:1"]
    assert text.tokens == pytest.approx(big.stat().st_size / 4, rel=0.05) and text.bytes == big.stat().st_size
    assert missing.error.endswith("no such file or folder; check the path")
    assert not plan.fits and isinstance(plan.refusal(), NotFound)
    lines = plan.lines()
    assert any(line.startswith("    skipped .env.local: looks like a credential") for line in lines)
    assert lines[-1].endswith("does NOT fit the limit of 1,000,000 tokens")
    too_long = plan_paths([big], max_tokens=100_000)
    with pytest.raises(TooLarge, match=r"big\.txt: is too long to read: 19\.0 MB, about 4,750,000 tokens"):
        too_long.check()
    assert plan_paths([root]).fits


# Hypothesis: any bytes, under any of the names ingest reads, give a Document or an IngestError.
SUFFIXES = [".txt", ".md", ".html", ".py", ".epub", ".pdf", ".txt.gz", ".rst", ""]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), suffix=st.sampled_from(SUFFIXES), prefix=st.sampled_from(
    [b"", b"%PDF-1.4\n", b"PK\x03\x04", codecs.BOM_UTF16_LE, b"<?xml version='1.0' encoding='utf-16'?>",
     b"\x1f\x8b\x08\x00"]))
def test_arbitrary_bytes_never_escape_as_another_exception(tmp_path, data, suffix, prefix):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(prefix + data)
    try:
        docs = read_paths([path])
    except IngestError as error:
        assert "\n" not in str(error)
        assert not isinstance(error, Unexpected), str(error)  # a failure no reader anticipated is a bug
        return
    assert any(segment.text.strip() for doc in docs for segment in doc.segments)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), which=st.sampled_from(["epub", "pdf"]))
def test_damaged_books_and_pdfs_never_escape_as_another_exception(tmp_path, flips, cut, which):
    if which == "epub":
        data = bytearray(_epub(tmp_path / "base.epub", [_xhtml(LATIN1, "iso-8859-1"), _xhtml("two")]).read_bytes())
    else:
        data = bytearray(PDF)
    for offset, value in flips:
        data[offset % len(data)] ^= value
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp_path / f"damaged.{which}"
    path.write_bytes(bytes(data))
    try:
        read_paths([path])
    except IngestError as error:
        assert "\n" not in str(error)
        assert not isinstance(error, Unexpected), str(error)


# Codecs a page or chapter may declare, each with a script it can hold.
DECLARED = {"utf-8": "ÄñЖλ中", "iso-8859-1": "ÄÖÜßéàç", "windows-1252": "ÄéŠœŸ", "cp1251": "ЖЩЮжщю",
            "koi8-r": "ЖЩЮжщю", "iso-8859-7": "ΑΒΓαβγλ", "shift_jis": "日本語かな", "gb2312": "中文字符",
            "euc-kr": "한국어글", "utf-16-le": "ÄЖλ中😀", "utf-16-be": "ÄЖλ中😀"}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(codec=st.sampled_from(sorted(DECLARED)), data=st.data(), how=st.sampled_from(["xml", "meta"]),
       container=st.sampled_from(["html", "epub"]))
def test_declared_encodings_are_honoured_for_any_text_they_can_hold(tmp_path, codec, data, how, container):
    letters = st.sampled_from(list(DECLARED[codec] + "abcXYZ"))
    words = data.draw(st.lists(st.text(letters, min_size=1, max_size=8), min_size=1, max_size=12))
    body = " ".join(words)
    if codec.startswith("utf-16"):
        how = "xml"  # a UTF-16 page without a BOM is recognised by its XML declaration's bytes
    markup = _xhtml(body, codec, how)
    if container == "epub":
        path = _epub(tmp_path / "book.epub", [markup])
    else:
        path = tmp_path / "page.xhtml"
        path.write_bytes(markup)
    text = read_paths([path])[0].segments[-1].text
    assert body in text, (codec, how, body, text)


CLI_CASES = ["pdf_truncated_half", "pdf_password", "gz_bomb", "epub_chapter_bomb", "epub_bad_opf_xml",
             "txt_whitespace", "txt_nul_after_9k", "html_only_markup", "fifo", "symlink_loop", "missing",
             "repo_secrets_and_junk", "docx_unsupported"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_real_entry_point_gives_one_line_and_exit_3_or_reads(name, tmp_path):
    case = next(case for case in CASES if case.name == name)
    path = case.build(tmp_path)
    entry = Path(sys.executable).parent / "salachat"
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "salachat"]
    env = {**os.environ, "SALACHAT_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    started = time.perf_counter()
    result = subprocess.run([*command, "ingest", str(path)], check=False, capture_output=True, text=True, env=env,
                            timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert time.perf_counter() - started < 60
    assert "Traceback" not in result.stdout + result.stderr
    if case.error is None:
        assert result.returncode == 0, result.stderr
        assert str(path) in result.stdout
    else:
        assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.strip().split("\n")
        assert case.says in lines[-1] and result.stdout == "", (result.stdout, result.stderr)
        assert sum(case.says in line for line in lines) == 1  # said once, not by the plan and again
        if case.error is TooLarge and len(lines) > 1:  # the plan of what would be read, then the refusal
            assert lines[-2].startswith("total about") and "does NOT fit" in lines[-2], lines
        else:
            assert len(lines) == 1, lines


def test_all_chapters_together_are_capped_after_decompression(tmp_path, monkeypatch):
    from salachat.ingest import epub

    monkeypatch.setattr(epub, "MAX_BOOK_BYTES", 3 << 20)
    chapters = [b"<html><body><p>" + b"   " * (400_000) + b"</p></body></html>"] * 4  # 1.2 MB of spaces each
    path = _epub(tmp_path / "wide.epub", chapters)
    with pytest.raises(TooLarge, match="its chapters decompress to more than 3.1 MB"):
        read_paths([path])


def test_a_page_far_too_long_is_refused_from_its_start_not_parsed_whole(tmp_path, monkeypatch):
    from salachat.ingest import stream

    path = tmp_path / "page.html"
    row = b"<tr><td class='c'><span>cell</span></td><td class='d'><span>value</span></td></tr>\n"
    path.write_bytes(b"<html><body><table>" + row * (12 * 10**6 // len(row)) + b"</table></body></html>")
    read = []
    real_chunks = stream.Input.chunks

    def counting(self, size=stream.CHUNK_BYTES):
        for chunk in real_chunks(self, size):
            read.append(len(chunk))
            yield chunk

    monkeypatch.setattr(stream.Input, "chunks", counting)
    with pytest.raises(TooLarge, match=r"page\.html: is too long to read: 12\.0 MB, about") as caught:
        read_paths([path], max_tokens=150_000)
    assert sum(read) <= 5 << 20 and caught.value.tokens > 300_000


def test_code_that_names_a_key_header_is_read_but_code_embedding_a_key_is_not(tmp_path):
    header = "-----BEGIN " + "RSA PRIVATE KEY-----"
    body = "MIIEowIBAAKCAQEAx4Xa1b2c3d4e5f6g7h8i9j0kLmNoPqRsTuVwXyZ0123456789ab"
    root = _tree(tmp_path / "repo", {
        "parse.py": f'START = b"{header}"\nEND = b"-----END"\n',  # as in a library that parses keys
        "fixture.py": f'KEY = "{header}\\n{body}\\n"\n',
        "legacy.txt": f"{header}\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n",
    })
    doc = read_paths([root])[0]
    assert [segment.path for segment in doc.segments] == ["parse.py"]
    reasons = {item.path: item.reason for item in doc.skipped}
    assert reasons["fixture.py"].startswith("looks like a credential") and reasons["legacy.txt"].startswith("looks")


def test_a_walk_over_too_many_files_is_refused_not_listed_for_minutes(tmp_path, monkeypatch):
    from salachat.ingest import repo

    monkeypatch.setattr(repo, "MAX_WALK_ENTRIES", 50)
    root = _tree(tmp_path / "tree", {f"d{n // 10}/f{n}.py": "x = 1\n" for n in range(80)})
    with pytest.raises(TooLarge, match=rf"^{root}: holds more than 50 files and folders; pass the subfolder that"):
        read_paths([root])
    assert plan_paths([root]).items[0].error.endswith("or add a .gitignore")


def test_several_documents_share_one_limit(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("words of the first text\n" * 20_000)  # ~120K tokens each
    second.write_text("words of the other text\n" * 20_000)
    assert len(read_paths([first], max_tokens=200_000)) == 1
    with pytest.raises(TooLarge, match=r"b\.txt: is too long to read: .* tokens \(with 120,000 tokens of the "
                                       r"documents before it\), more than the 200,000"):
        read_paths([first, second], max_tokens=200_000)


def test_unreadable_gitignore_patterns_are_skipped_and_the_rest_still_apply(tmp_path):
    from salachat.ingest.repo import walk_repo

    root = _tree(tmp_path / "g", {".gitignore": "!\n\\\n[z-a]\n[[a]\n*.log\n", "a.log": "x\n", "main.py": "x\n"})
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files, skipped = walk_repo(root)
    assert not caught, [str(warning.message) for warning in caught]  # "[[a]" makes re warn: not shown
    assert {file.relative for file in files} == {".gitignore", "main.py"}
    assert {item.path: item.reason for item in skipped}["a.log"] == "ignored by .gitignore"
