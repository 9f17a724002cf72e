"""What a manifest must hold, checked field by field before anything uses it.

A manifest passes its own checksum when it is the one salachat wrote, but also when someone wrote it by
hand or by program and computed the checksum too: every field is therefore checked for its type and its
range here, so that a crafted or buggy manifest gives one line (`ManifestInvalid`), never a KeyError, a
TypeError deep in a load, a memory blow-up from an absurd shape, or a file read outside the session folder.
No torch here: `salachat sessions list` and `show` validate too.
"""

from __future__ import annotations

import re

from salachat.sessions import atomic

# engine.cache registry names; store.py checks at load that the engine still knows them all
CACHE_KIND_NAMES = ("kv", "sparse_kv", "long_context_kv", "lightning")
DTYPE_NAMES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MODEL_DTYPES = ("float32", "bfloat16", "float16")
QUANTS = (None, "int8", "nf4")
LONG_CONTEXT_MODES = ("dense", "extended", "native")
BIG = 1 << 50  # larger than any real count of tokens, bytes or positions; JSON can spell far larger
MAX_RANK = 8
# Every file a manifest may name: a plain name (no folder part, no leading dot), of a kind the store writes.
DATA_FILE = re.compile(r"(text-[0-9a-f]{16}\.json|(kv|state)-[0-9]{6}\.safetensors)\Z")
# a plain sha256 (the oldest sessions), or a piece tree's prefix and top hash (atomic.TREES); nothing else
CHECKSUM = re.compile("|".join([r"[0-9a-f]{64}\Z"] + [
    f"{re.escape(tree.prefix)}[0-9a-f]{{{tree.hex_digits}}}\\Z" for tree in atomic.TREES]))
HEX64 = re.compile(r"[0-9a-f]{64}\Z")
HEX = re.compile(r"[0-9a-f]*\Z")


class ManifestInvalid(ValueError):
    """The manifest has the right checksum but not the right shape; `str()` names the field."""


class ManifestOutdated(ManifestInvalid):
    """A manifest of an older salachat that this one does not resume."""


def _fail(where: str, problem: str):
    raise ManifestInvalid(f"{where} {problem}")


def _int(value, where: str, low: int = 0, high: int = BIG) -> int:
    if type(value) is not int:  # bool is an int to Python, not to us
        _fail(where, f"is {type(value).__name__}, not a whole number")
    if not low <= value <= high:
        _fail(where, f"is {value}, outside {low}..{high}")
    return value


def _str(value, where: str, allow_none: bool = False, limit: int = 1 << 30) -> str | None:
    if value is None and allow_none:
        return None
    if type(value) is not str:
        _fail(where, f"is {type(value).__name__}, not text")
    if len(value) > limit:
        _fail(where, f"is {len(value):,} characters long")
    return value


def _dict(value, where: str) -> dict:
    if type(value) is not dict:
        _fail(where, f"is {type(value).__name__}, not an object")
    return value


def _list(value, where: str) -> list:
    if type(value) is not list:
        _fail(where, f"is {type(value).__name__}, not a list")
    return value


def _key(body: dict, key: str, where: str):
    if key not in body:
        _fail(f"{where}.{key}" if where else key, "is missing")
    return body[key]


def _choice(value, where: str, choices: tuple):
    if value not in choices or type(value) not in (str, type(None)):
        _fail(where, f"is {value!r}, not one of {', '.join(map(repr, choices))}")
    return value


def check(manifest: dict) -> dict:
    """Raise ManifestInvalid unless every field the store and the CLI read is there with its type and range.
    Returns the manifest with the fields older versions did not write filled in (model.quant and
    model.long_context)."""
    for key in ("created", "updated"):
        _str(_key(manifest, key, ""), key, limit=64)
    model = _dict(_key(manifest, "model", ""), "model")
    for key in ("id", "fingerprint", "family"):
        _str(_key(model, key, "model"), f"model.{key}", limit=4096)
    _choice(_key(model, "dtype", "model"), "model.dtype", MODEL_DTYPES)
    flags = model["fingerprint"].split("+")[1:]
    if "quant" not in model:  # written before the field: the loader appended it to the fingerprint
        model["quant"] = next((f for f in flags if f in ("int8", "nf4")), None)
    _choice(model["quant"], "model.quant", QUANTS)
    if "long_context" not in model:
        if "sparse" in flags:
            # the long-context mode of a dense model before it was a field of its own: this salachat's
            # extension may not rebuild that cache, and a wrong guess would answer from a mismatched state
            raise ManifestOutdated("it was read in the old '+sparse' mode")
        model["long_context"] = "native" if model["family"] == "minicpm_sala" else "dense"
    _choice(model["long_context"], "model.long_context", LONG_CONTEXT_MODES)
    if type(model.setdefault("packed", False)) is not bool:  # GGUF weights kept quantised when read
        _fail("model.packed", "is not true or false")

    for i, doc in enumerate(_list(_key(manifest, "documents", ""), "documents")):
        doc = _dict(doc, f"documents[{i}]")
        for key in ("source", "kind", "title", "content_hash"):
            _str(doc.get(key), f"documents[{i}].{key}", allow_none=True, limit=1 << 16)
        for key in ("segments", "skipped"):
            if key in doc:
                _int(doc[key], f"documents[{i}].{key}")
    tokens = _int(_key(manifest, "tokens", ""), "tokens")
    _int(_key(manifest, "document_tokens", ""), "document_tokens")
    _int(_key(manifest, "next_file", ""), "next_file", high=999_999)

    files = _dict(_key(manifest, "files", ""), "files")
    for name, info in files.items():
        if not DATA_FILE.match(name):
            _fail(f"files[{name!r}]", "is not a file name a session holds (no folders, no other names)")
        info = _dict(info, f"files[{name!r}]")
        if not CHECKSUM.match(_str(_key(info, "sha256", f"files[{name!r}]"), f"files[{name!r}].sha256", limit=80)):
            _fail(f"files[{name!r}].sha256", "is not a checksum")
        size = _int(_key(info, "bytes", f"files[{name!r}]"), f"files[{name!r}].bytes")
        if "pieces" in info:
            _check_pieces(info["pieces"], info["sha256"], size, f"files[{name!r}].pieces")

    saved = _dict(_key(manifest, "conversation", ""), "conversation")
    _int(_key(saved, "chunk_size", "conversation"), "conversation.chunk_size", low=1, high=1 << 24)
    text_file = _str(_key(saved, "text_file", "conversation"), "conversation.text_file", limit=64)
    if not text_file.startswith("text-") or text_file not in files:
        _fail("conversation.text_file", f"is {text_file!r}, not one of the session's text files")
    after = _str(_key(saved, "fed_text_after_reading", "conversation"), "conversation.fed_text_after_reading",
                 allow_none=True)
    fed = _str(_key(saved, "fed_text", "conversation"), "conversation.fed_text", allow_none=True)
    if (after is None) == (fed is None):
        _fail("conversation", "must hold exactly one of fed_text and fed_text_after_reading")
    _int(_key(saved, "pending_tokens", "conversation"), "conversation.pending_tokens")
    if not HEX64.match(_str(_key(saved, "pending_sha256", "conversation"), "conversation.pending_sha256", limit=80)):
        _fail("conversation.pending_sha256", "is not a sha256")
    for i, turn in enumerate(_list(_key(saved, "turns", "conversation"), "conversation.turns")):
        turn = _dict(turn, f"conversation.turns[{i}]")
        _str(_key(turn, "question", f"conversation.turns[{i}]"), f"conversation.turns[{i}].question")
        _str(_key(turn, "answer", f"conversation.turns[{i}]"), f"conversation.turns[{i}].answer")
        _dict(_key(turn, "stats", f"conversation.turns[{i}]"), f"conversation.turns[{i}].stats")
        if "quoted" in turn:  # the passage placed before the question (sessions read past a trained length)
            _str(turn["quoted"], f"conversation.turns[{i}].quoted")

    cache = _dict(_key(manifest, "cache", ""), "cache")
    _check_cache(cache, files, tokens)
    return manifest


def _check_pieces(pieces, checksum: str, size: int, where: str) -> None:
    """The per-piece digests a lazy load verifies pieces against must be the ones the file checksum is of."""
    _list(pieces, where)
    tree = atomic.tree_of(checksum)
    if len(pieces) != max(1, -(-size // atomic.PIECE)) or tree is None:
        _fail(where, f"lists {len(pieces)} pieces for {size:,} bytes")
    for i, piece in enumerate(pieces):
        text = _str(piece, f"{where}[{i}]", limit=64)
        if len(text) != tree.hex_digits or not HEX.match(text):
            _fail(f"{where}[{i}]", f"is not a {tree.prefix.rstrip(':')} piece digest")
    if tree.checksum([bytes.fromhex(p) for p in pieces]) != checksum:
        _fail(where, "do not add up to the file's checksum")


def _check_cache(cache: dict, files: dict, tokens: int) -> None:
    meta = _dict(_key(cache, "meta", "cache"), "cache.meta")
    position = _int(_key(meta, "position", "cache.meta"), "cache.meta.position")
    if position != tokens:
        _fail("cache.meta.position", f"is {position}, the manifest says {tokens} tokens")
    layers = _list(_key(meta, "layers", "cache.meta"), "cache.meta.layers")
    if len(layers) > 4096:
        _fail("cache.meta.layers", f"lists {len(layers)} layers")
    for i, layer in enumerate(layers):
        layer = _dict(layer, f"cache.meta.layers[{i}]")
        _choice(_key(layer, "kind", f"cache.meta.layers[{i}]"), f"cache.meta.layers[{i}].kind", CACHE_KIND_NAMES)
        for key, value in layer.items():
            if key != "kind":
                _int(value, f"cache.meta.layers[{i}].{key}")
    tensors = _dict(_key(cache, "tensors", "cache"), "cache.tensors")
    for name, entry in tensors.items():
        where = f"cache.tensors[{name!r}]"
        match = re.fullmatch(r"layers\.([0-9]{1,4})\.[a-z0-9_]{1,32}", name)
        if not match or int(match.group(1)) >= len(layers):
            _fail(where, "does not name a tensor of one of the cache's layers")
        entry = _dict(entry, where)
        dtype = _choice(_key(entry, "dtype", where), f"{where}.dtype", DTYPE_NAMES)
        shape = _list(_key(entry, "shape", where), f"{where}.shape")
        if len(shape) > MAX_RANK:
            _fail(f"{where}.shape", f"has {len(shape)} dimensions")
        count = 1
        for j, dim in enumerate(shape):
            count *= _int(dim, f"{where}.shape[{j}]")
        axis = _key(entry, "axis", where)
        if axis is not None:
            _int(axis, f"{where}.axis", high=len(shape) - 1)
            _str(_key(entry, "edge", where), f"{where}.edge", limit=64)
        segments = _list(_key(entry, "segments", where), f"{where}.segments")
        if not segments or len(segments) > 1_000_000:
            _fail(f"{where}.segments", f"lists {len(segments)} segments")
        if axis is None and len(segments) != 1:
            _fail(f"{where}.segments", "must be one for a tensor that is rewritten whole")
        covered = 0
        for j, seg in enumerate(segments):
            seg = _dict(seg, f"{where}.segments[{j}]")
            file = _str(_key(seg, "file", f"{where}.segments[{j}]"), f"{where}.segments[{j}].file", limit=64)
            if file not in files or not file.endswith(".safetensors"):
                _fail(f"{where}.segments[{j}].file", f"is {file!r}, not one of the session's tensor files")
            length = _key(seg, "length", f"{where}.segments[{j}]")
            if axis is not None:
                covered += _int(length, f"{where}.segments[{j}].length")
            elif length is not None:
                _fail(f"{where}.segments[{j}].length", "must be null for a tensor that is rewritten whole")
        if axis is not None and covered != shape[axis]:
            _fail(f"{where}.segments", f"cover {covered} positions of {shape[axis]}")
        # a shape may only promise as many bytes as its files hold: no allocating terabytes on a lie
        nbytes = count * DTYPE_BYTES[dtype]
        held = sum(files[file]["bytes"] for file in {seg["file"] for seg in segments})
        if nbytes > held:
            _fail(where, f"claims {nbytes:,} bytes, its files hold {held:,}")
