"""The blocks of a long document that a question is about, found by its words (BM25 over token blocks).

Past a dense model's trained length the long-context extension attends a few memory blocks besides its local
window. Chosen by attention scores alone, the default model's selection rarely puts the block that answers
the question first, and every block it attends beside that one dilutes it (docs/architecture.md, "Long
context for RoPE models"). A question usually names what it asks about ("the pass key of the red box",
"the header file of Libtasn1"), so the words it shares with the document point at the block to read; the
answer's tokens then attend those blocks in the same in-range memory frame as any selected block.

Terms are the tokenizer's own ids, folded to one id per lower-cased, stripped spelling (" Key", "key" and
" key" count as one term); tokens without a letter or digit, and single characters, are not terms. Pairs of
adjacent terms count as terms too: "pass key" is rare in a manual where "pass" and "key" are not, and it
is what tells the block that answers from the many that use both words.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

K1 = 1.2  # BM25's usual constant (Robertson & Zaragoza)


def term_ids(tokenizer) -> torch.Tensor:
    """[vocab] int64: each token id's term (the first id with the same folded spelling), -1 for none; made
    once per tokenizer (0.1 s for 49K ids) and kept on it."""
    fold = getattr(tokenizer, "_focus_terms", None)
    if fold is None:
        vocab = tokenizer.vocab_size
        texts = tokenizer.backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=True)
        first: dict[str, int] = {}
        out = []
        for i, text in enumerate(texts):
            word = text.strip().lower()
            if len(word) < 2 or "\ufffd" in word or not any(c.isalnum() for c in word):
                out.append(-1)
            else:
                out.append(first.setdefault(word, i))
        fold = tokenizer._focus_terms = torch.tensor(out, dtype=torch.int64)
    return fold


def rank_blocks(document_ids, question_ids, fold: torch.Tensor, block: int, n: int, skip_blocks: int = 0
                ) -> list[int]:
    """The blocks of `block` tokens under the (at most) n spans of the document that score best against the
    question by BM25, best span first (ties: the earlier span). Spans are `block` tokens long and start every
    half block, so a sentence cut by a block boundary is scored whole and brings both its blocks; spans
    reaching into the first `skip_blocks` blocks, and spans sharing no term with the question, are never
    chosen."""
    doc = torch.as_tensor(document_ids, dtype=torch.int64)
    half = block // 2
    n_halves = -(-doc.numel() // half)
    skip = 2 * skip_blocks  # the first span allowed starts at this half
    if n <= 0 or n_halves - 1 <= skip:
        return []
    vocab = fold.numel()
    q_terms = _with_pairs(fold[torch.as_tensor(question_ids, dtype=torch.int64)], vocab)
    q_terms = torch.unique(q_terms[q_terms >= 0])
    if q_terms.numel() == 0:
        return []
    terms = _with_pairs(fold[doc], vocab)  # [2N]: unigrams, then the pair starting at each position
    positions = torch.isin(terms, q_terms).nonzero().flatten()
    if positions.numel() == 0:
        return []
    # tf[half, term]: occurrences of each question term in each half block; a span is two halves
    which = torch.searchsorted(q_terms, terms[positions])
    tf = torch.zeros(n_halves + 1, q_terms.numel(), dtype=torch.float64)
    tf.index_put_(((positions % doc.numel()) // half, which), torch.ones(positions.numel(), dtype=torch.float64),
                  accumulate=True)
    tf = (tf[:-1] + tf[1:])[skip : n_halves - 1]  # spans starting at halves skip .. n_halves - 2
    df = (tf > 0).sum(0).double()
    idf = torch.log(1 + (tf.shape[0] - df + 0.5) / (df + 0.5))
    scores = (idf * tf * (K1 + 1) / (tf + K1)).sum(1)  # every span is `block` long: no length norm
    order = torch.sort(-scores, stable=True).indices[:n]
    blocks: list[int] = []
    for span in order.tolist():
        if scores[span] <= 0:
            break
        first = (span + skip) // 2
        for b in (first, first + 1) if (span + skip) % 2 else (first,):
            if b not in blocks and b * block < doc.numel():
                blocks.append(b)
    return blocks


def _with_pairs(terms: torch.Tensor, vocab: int) -> torch.Tensor:
    """terms [N] (-1: none) followed by the pair of terms starting at each position [N] (-1 where either is
    none), pairs numbered after the vocabulary."""
    pairs = torch.full_like(terms, -1)
    if terms.numel() > 1:
        a, b = terms[:-1], terms[1:]
        pairs[:-1] = torch.where((a >= 0) & (b >= 0), vocab + a * vocab + b, -1)
    return torch.cat([terms, pairs])


def quote(passage: str, question: str, reach: int = 4, heading_words: int = 6) -> str:
    """The paragraph of `passage` (the text of the focus blocks) around the line that best matches the
    question: at most `reach` lines either side of it, not across a blank line. The blocks start wherever a
    block boundary fell, mid-paragraph; the default model tends to answer by copying the first line it was
    quoted ("Patch 8.2.0431" before the key it was asked for), so the quote starts where the matching text
    does. A paragraph of fewer than `heading_words` words (a heading) brings the paragraph after it. Lines are
    scored by the question's words they hold, each weighted by BM25's idf over the passage's lines; the
    passage is returned whole when no line shares a word with the question."""
    lines = passage.strip().split("\n")
    asked = set(_words(question))
    held = [set(_words(line)) & asked for line in lines]
    df = Counter(word for words in held for word in words)
    n = sum(1 for line in lines if line.strip())
    scores = [sum(math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5)) for w in words) for words in held]
    best = max(range(len(lines)), key=lambda i: (scores[i], -i))
    if scores[best] <= 0:
        return passage.strip()
    lo, hi = _paragraph(lines, best, reach)
    if len(_words(" ".join(lines[lo : hi + 1]))) < heading_words:
        following = hi + 1
        while following < len(lines) and not lines[following].strip():
            following += 1
        if following < len(lines):
            hi = _paragraph(lines, following, reach)[1]
    return "\n".join(lines[lo : hi + 1]).strip()


def _words(text: str) -> list[str]:
    return re.findall(r"\w\w+", text.lower())


def _paragraph(lines: list[str], at: int, reach: int) -> tuple[int, int]:
    lo = hi = at
    while lo > 0 and at - lo < reach and lines[lo - 1].strip():
        lo -= 1
    while hi < len(lines) - 1 and hi - at < reach and lines[hi + 1].strip():
        hi += 1
    return lo, hi
