"""Tokenizer and chat template, built with `tokenizers` from a GGUF vocabulary or an HF tokenizer.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's pre-tokenizer names → (split digits one by one first, split regex)
_PRE_TOKENIZERS = {
    "default": (False, GPT2_SPLIT),
    "gpt2": (False, GPT2_SPLIT),
    "smollm": (True, GPT2_SPLIT),
    "starcoder": (True, GPT2_SPLIT),
    "refact": (True, GPT2_SPLIT),
    "codeshell": (True, GPT2_SPLIT),
    "llama-bpe": (False, LLAMA3_SPLIT),
    "llama3": (False, LLAMA3_SPLIT),
    "qwen2": (False, QWEN2_SPLIT),
}
# Tokens that end a turn in the chat formats we know; added to the stop set when the vocabulary has them.
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>")
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


LONG_TEXT = 1 << 17  # characters from which `encode` goes piece by piece
PIECE_CHARS = 1 << 16
_SAFE_CUT = re.compile(r"(?<=[^\W\d_])\s")  # whitespace right after a letter


class TokenizerError(ValueError):
    pass


class Tokenizer:
    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        chat_template: str | None,
        extra_stop_ids: tuple[int, ...] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template
        stops = {backend.token_to_id(t) for t in TURN_END_TOKENS} | set(extra_stop_ids)
        if eos_token:
            stops.add(backend.token_to_id(eos_token))
        self.stop_ids = frozenset(i for i in stops if i is not None)
        self._template = None
        self.splits_safely = _splits_safely(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text`; a long text is encoded piece by piece (`encode_long`), with the same ids."""
        if len(text) > LONG_TEXT and self.splits_safely:
            ids = self.encode_long(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def encode_long(self, text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
        """The ids of `text` in bounded memory: `tokenizers` holds about 600 bytes per token while it encodes
        (offsets, strings, type ids …), so a million-token text costs 600 MB at once; here each piece of
        about `piece_chars` costs that, and only the ids are kept.

        The text is cut only where no token can span the cut: after a letter and before whitespace. Every
        byte-level pre-tokenizer regex we build (GPT-2's, Llama 3's, Qwen2's) ends a match at the last letter
        of a run and never joins whitespace to the letters before it, and BPE merges never cross a
        pre-token, so the pieces' ids are the whole text's ids. (SentencePiece vocabularies prepend "▁" to
        each text they see: those are encoded whole.)"""
        if not self.splits_safely:
            return self.backend.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        start = 0
        while start < len(text):
            end = len(text)
            if end - start > piece_chars:
                cut = _SAFE_CUT.search(text, start + piece_chars)
                end = cut.start() if cut else len(text)
            ids.extend(self.backend.encode(text[start:end], add_special_tokens=False).ids)
            start = end
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            # No template in the checkpoint: a plain transcript the model can continue.
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
            return text + ("Assistant:" if add_generation_prompt else "")
        from salachat.engine.chat_template import ChatTemplate, TemplateError

        try:
            if self._template is None:
                self._template = ChatTemplate(self.chat_template)
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
                documents=None,
            )
        except TemplateError as e:
            raise TokenizerError(str(e)) from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=True)

    @staticmethod
    def check_gguf_metadata(meta: dict) -> None:
        """TokenizerError unless the GGUF's vocabulary is one we build (cheap: no tokenizer is built)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' and "
                                 "SentencePiece 'llama' are)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if kind == "gpt2" and pre not in _PRE_TOKENIZERS:
            raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(_PRE_TOKENIZERS)})")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("GGUF tokenizer.ggml.tokens is missing or not a list of strings")
        for key in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = meta.get(key, [])
            if not isinstance(value, list):
                raise TokenizerError(f"GGUF {key} is not a list")
        merges = meta.get("tokenizer.ggml.merges", [])
        if not all(isinstance(m, str) and " " in m for m in merges):
            raise TokenizerError("GGUF tokenizer.ggml.merges holds an entry that is not 'left right'")
        types = meta.get("tokenizer.ggml.token_type", [])
        if types and (len(types) != len(tokens) or not all(isinstance(t, int) for t in types)):
            raise TokenizerError("GGUF tokenizer.ggml.token_type does not give one whole number per token")

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        cls.check_gguf_metadata(meta)
        if meta.get("tokenizer.ggml.model") == "llama":
            return cls._from_gguf_sentencepiece(meta)
        pre = meta.get("tokenizer.ggml.pre", "default")
        split_digits, split_regex = _PRE_TOKENIZERS[pre]
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = _HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
        steps += [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type", [])
        specials = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, t in enumerate(types)
            if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
        ]
        backend.add_special_tokens(specials)

        return cls._from_gguf_backend(backend, meta)

    @classmethod
    def _from_gguf_backend(cls, backend, meta: dict) -> Tokenizer:
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key):
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_token=token("tokenizer.ggml.bos_token_id"),
            eos_token=token("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def _from_gguf_sentencepiece(cls, meta: dict) -> Tokenizer:
        """llama.cpp's "llama" vocabulary (SentencePiece BPE: ▁ for spaces, <0xNN> byte fallback, scores for
        merge priority) as a `tokenizers` BPE, the way transformers converts SentencePiece models: the merges
        are every split of a piece into two pieces, the piece with the higher score merged first."""
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        if len(scores) != len(tokens):
            raise TokenizerError("GGUF tokenizer.ggml.scores does not give one score per token")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = []
        for piece, i in vocab.items():
            if types[i] != 1:  # only normal pieces come from merges
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((scores[i], vocab[left], vocab[right], left, right))
        merges.sort(key=lambda m: (-m[0], m[1], m[2]))
        unk = next((t for t, kind in zip(tokens, types) if kind == 2), None)
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges],
                                          unk_token=unk, fuse_unk=True, byte_fallback=True))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(content=" ", left=1)])
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in (_GGUF_CONTROL, _GGUF_USER_DEFINED)])
        return cls._from_gguf_backend(backend, meta)

    @classmethod
    def from_hf_folder(cls, folder: str | Path, extra_stop_ids: tuple[int, ...] = ()) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{folder} has no tokenizer.json: pass the folder of the downloaded checkpoint")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (tokenizers raises its own exception type for any malformed file)
            raise TokenizerError(f"{path} is not a tokenizer the tokenizers library can read "
                                 f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise TokenizerError(f"{folder / 'tokenizer_config.json'} is not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{folder / 'tokenizer_config.json'} does not hold a JSON object")

        def token(key):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return value if isinstance(value, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses the one called "default"
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
        # tokenizer.json's post-processor may add BOS itself; we add it explicitly instead, once.
        backend.no_truncation()
        return cls(
            backend,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            add_bos=bool(config.get("add_bos_token", False)),
            chat_template=template if isinstance(template, str) else None,
            extra_stop_ids=extra_stop_ids,
        )


_SAFE_SPLITS = {GPT2_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT}


def _splits_safely(backend: _HFTokenizer) -> bool:
    """Whether a text may be cut after a letter before whitespace: a byte-level BPE whose split regex is one
    we know (or ByteLevel's own), with no normaliser that adds text."""
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, TypeError):
        return False
    if (spec.get("model") or {}).get("type") != "BPE":
        return False
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ("NFC", "NFKC"):
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(step.get("type") == "ByteLevel" for step in steps):
        return False
    for step in steps:
        if step.get("type") == "Split":
            pattern = step.get("pattern") or {}
            if pattern.get("Regex") not in _SAFE_SPLITS:
                return False
        elif step.get("type") not in ("ByteLevel", "Digits"):
            return False
    return True


class StreamDecoder:
    """Turns generated ids into text pieces, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted) :]
        self.emitted = text
        return piece
