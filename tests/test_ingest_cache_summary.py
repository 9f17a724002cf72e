"""The content-hash cache makes re-reading free; the summary tells the CLI what would be read."""

from __future__ import annotations

import json
import os

import salachat.ingest.reader  # noqa: F401
from salachat.ingest import count_tokens, estimate_tokens, read_paths, render_prompt, summarize
from salachat.ingest.synthetic_pdf import make_pdf

from salachat import ingest


def test_unchanged_pdf_is_served_from_the_cache_even_at_a_new_path(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first_path = tmp_path / "book.pdf"
    first_path.write_bytes(make_pdf(["alpha", "beta"]))
    first = read_paths([first_path], cache_dir=cache_dir)[0]
    assert list((cache_dir / "ingest").glob("*.json"))

    def must_not_parse(*args, **kwargs):
        raise AssertionError("parsed again although the bytes did not change")

    monkeypatch.setattr(ingest.reader, "read_pdf", must_not_parse)
    moved = tmp_path / "moved.pdf"
    moved.write_bytes(first_path.read_bytes())
    again = read_paths([moved], cache_dir=cache_dir)[0]
    assert again.source == str(moved) and again.meta["cached"] is True
    assert again.segments == first.segments and again.content_hash == first.content_hash


def test_changed_file_is_parsed_again(tmp_path):
    cache_dir = tmp_path / "cache"
    path = tmp_path / "notes.md"
    path.write_text("# One\n")
    read_paths([path], cache_dir=cache_dir)
    path.write_text("# Two\n")
    doc = read_paths([path], cache_dir=cache_dir)[0]
    assert doc.title == "Two" and not doc.meta.get("cached")


def test_damaged_cache_entry_is_ignored(tmp_path):
    cache_dir = tmp_path / "cache"
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    read_paths([path], cache_dir=cache_dir)
    for entry in (cache_dir / "ingest").glob("*.json"):
        entry.write_text("{not json")
    assert read_paths([path], cache_dir=cache_dir)[0].segments[0].text == "hello"


def test_password_protected_pdf_text_is_never_written_to_the_cache(tmp_path):
    import io

    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(["classified"]))))
    writer.encrypt(user_password="pw", owner_password="owner", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    path = tmp_path / "locked.pdf"
    path.write_bytes(buffer.getvalue())
    read_paths([path], password="pw", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_summary_reports_pages_tokens_skips_and_estimates(tmp_path):
    pdf = tmp_path / "scan.pdf"
    pdf.write_bytes(make_pdf(["Some words on the first page.", None]))
    repo = tmp_path / "repo"
    (repo / "node_modules").mkdir(parents=True)
    (repo / "main.py").write_text("print('hello')\n")
    docs = read_paths([pdf, repo])
    summary = summarize(docs, bytes_per_token=1000, tokens_per_second=100.0)
    data = json.loads(json.dumps(summary.to_dict()))  # the CLI's --json must serialise as is
    first, second = data["documents"]
    assert (first["kind"], first["pages"], first["pages_without_text"]) == ("pdf", 2, 1)
    assert (second["kind"], second["files"]) == ("repo", 1)
    assert second["skipped"] == [{"path": "node_modules/", "reason": "vendored dependencies"}]
    assert data["tokens"] == first["tokens"] + second["tokens"] and data["tokens_exact"] is False
    assert data["estimated_memory_bytes"] == data["tokens"] * 1000
    assert data["estimated_seconds"] == data["tokens"] / 100.0
    note = f"{pdf}: 1 of 2 pages have no text layer (scanned images?); they are not read (no OCR)"
    assert data["notes"] == [note]


def test_exact_counts_use_the_given_tokenizer_on_the_rendered_prompt(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one two three four\n")
    docs = read_paths([path])

    def words(text: str) -> list[str]:  # a stand-in tokenizer: one token per word
        return text.split()

    assert count_tokens(docs, words) == len(render_prompt(docs).split())
    summary = summarize(docs, tokenizer_encode=words)
    assert summary.tokens_exact and summary.tokens == count_tokens(docs, words)


def test_token_estimate_counts_wide_characters_one_each():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd" * 10) == 10
    assert estimate_tokens("日本語") == 3



def test_cache_evicts_least_recently_used_entries_past_its_cap(tmp_path):
    from salachat.ingest import cache

    cache_dir = tmp_path / "cache"
    docs = []
    for name in ("a", "b", "c"):
        path = tmp_path / f"{name}.txt"
        path.write_text(name * 1000)
        docs.append(read_paths([path])[0])
    for age, doc in enumerate(docs):
        cache.store(cache_dir, cache.file_key(doc.content_hash, doc.kind), doc, max_bytes=10**9)
        entry = next(p for p in (cache_dir / "ingest").glob("*.json") if p.name.startswith(doc.content_hash))
        os.utime(entry, (1000 + age, 1000 + age))
    one_entry = max(p.stat().st_size for p in (cache_dir / "ingest").glob("*.json"))
    cache.load(cache_dir, cache.file_key(docs[0].content_hash, "text"), "a.txt")  # "a" is used again
    fourth = tmp_path / "d.txt"
    fourth.write_text("d" * 1000)
    doc = read_paths([fourth])[0]
    cache.store(cache_dir, cache.file_key(doc.content_hash, doc.kind), doc, max_bytes=2 * one_entry + 10)
    kept = {p.name[:64] for p in (cache_dir / "ingest").glob("*.json")}
    assert kept == {docs[0].content_hash, doc.content_hash}


def test_cache_entries_are_private(tmp_path):
    import stat

    path = tmp_path / "book.pdf"
    path.write_bytes(make_pdf(["private words"]))
    read_paths([path], cache_dir=tmp_path / "cache")
    folder = tmp_path / "cache" / "ingest"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [stat.S_IMODE(entry.stat().st_mode) for entry in folder.iterdir()] == [0o600]
