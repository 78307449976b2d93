"""An offline English text corpus and a byte-level tokenizer, for pyobc's language-model test bed.

The corpus is the prose of the Python documentation that every CPython installation ships in the
standard library as :mod:`pydoc_data.topics` (the texts ``help("if")`` shows): about 80 topics and
65,000 words on CPython 3.11. It is read at run time and never copied into pyobc. Copyright Python
Software Foundation, distributed under the PSF License Agreement with Python itself (see
``pyobc/data/TEXT_README.md``). Its text differs between Python versions, so everything derived from
it (splits, trained weights, perplexities) is keyed by :func:`corpus_digest`.

Tokenisation is byte-level: a text's UTF-8 bytes are its token ids 0-255, plus three special ids
(:data:`PAD` 256, :data:`BOS` 257, :data:`EOS` 258), so :data:`VOCAB_SIZE` is 259 and nothing needs
training. The held-out split is a fixed set of whole topics, chosen by SHA-256 hashes of their keys
(no random number generator): topics are taken in hash order until they hold 10% of the corpus bytes.

Example:
    >>> from pyobc.corpus import BOS, ByteTokenizer, split_topics, token_stream
    >>> tok = ByteTokenizer()
    >>> ids = tok.encode("héllo")
    >>> ids.tolist(), tok.decode(ids)
    ([104, 195, 169, 108, 108, 111], 'héllo')
    >>> set(split_topics("train")).isdisjoint(split_topics("test"))
    True
    >>> stream = token_stream("test")
    >>> stream.dtype, int(stream[0]) == BOS
    (torch.int64, True)
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import torch

__all__ = ["PAD", "BOS", "EOS", "VOCAB_SIZE", "TEST_FRACTION", "ByteTokenizer", "topics", "corpus_digest",
           "split_topics", "token_stream"]

PAD = 256  #: padding id (masked out of losses by its attention mask)
BOS = 257  #: beginning of a document
EOS = 258  #: end of a document
VOCAB_SIZE = 259  #: 256 byte values + PAD, BOS, EOS
#: Fraction of the corpus bytes (whole topics) in the held-out ``"test"`` split.
TEST_FRACTION = 0.1

_SPLIT_SALT = "pyobc-text-split-v1"
_SPLITS = ("train", "test")
_lock = threading.Lock()
_streams: dict[str, torch.Tensor] = {}


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255) plus the special ids :data:`PAD`, :data:`BOS`, :data:`EOS`.

    ``encode`` is exact and reversible for every ``str``; ``decode`` drops special ids and replaces
    byte sequences that are not valid UTF-8 (a window cut inside a character) with U+FFFD.
    Calling the tokenizer on a list of texts pads them on the right into a batch dict.

    Example:
        >>> from pyobc.corpus import ByteTokenizer
        >>> batch = ByteTokenizer()(["ab", "c"], bos=True)
        >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        ([[257, 97, 98], [257, 99, 256]], [[1, 1, 1], [1, 1, 0]])
    """

    vocab_size = VOCAB_SIZE
    pad_token_id = PAD
    bos_token_id = BOS
    eos_token_id = EOS

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """``text``'s UTF-8 bytes as a 1-D int64 tensor, optionally framed by BOS / EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return torch.tensor(([BOS] if bos else []) + ids + ([EOS] if eos else []), dtype=torch.int64)

    def decode(self, ids) -> str:
        """The text of a sequence of ids (a 1-D tensor or a list); special ids are skipped."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if any(isinstance(v, list) for v in values):
            raise ValueError("decode takes one sequence (1-D); decode the rows of a batch one by one")
        bad = [v for v in values if not 0 <= int(v) < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {bad[:5]}")
        return bytes(int(v) for v in values if int(v) < 256).decode("utf-8", errors="replace")

    def __call__(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> dict[str, torch.Tensor]:
        """A batch ``{"input_ids", "attention_mask"}`` (int64, (B, T)), padded on the right with PAD."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        if not rows:
            raise ValueError("texts is empty")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def topics() -> dict[str, str]:
    """The corpus: topic key -> text, from the running Python's :mod:`pydoc_data.topics`.

    Example:
        >>> from pyobc.corpus import topics
        >>> "if" in topics()
        True
    """
    try:
        from pydoc_data.topics import topics as table  # a standard-library module, imported on first use
    except ImportError as exc:  # some minimal Python builds leave it out
        raise ImportError("pyobc's text corpus needs the standard library's pydoc_data package, which "
                          f"this Python installation lacks: {exc}") from exc
    return dict(table)


def corpus_digest() -> str:
    """The first 12 hex digits of a SHA-256 over every (key, text) of the corpus; changes with the
    Python version that ships it.

    Example:
        >>> from pyobc.corpus import corpus_digest
        >>> len(corpus_digest())
        12
    """
    h = hashlib.sha256()
    for key, text in sorted(topics().items()):
        h.update(key.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return h.hexdigest()[:12]


def _hash_key(key: str) -> bytes:
    return hashlib.sha256(f"{_SPLIT_SALT}:{key}".encode()).digest()


def _check_split(split) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def split_topics(split: str) -> list[str]:
    """Sorted topic keys of the ``"train"`` or ``"test"`` (held-out) split.

    Topics are ordered by a SHA-256 hash of their key; the first ones go to ``"test"`` until they
    hold at least :data:`TEST_FRACTION` of the corpus's UTF-8 bytes, the rest to ``"train"``.

    Example:
        >>> from pyobc.corpus import split_topics, topics
        >>> len(split_topics("train")) + len(split_topics("test")) == len(topics())
        True
    """
    _check_split(split)
    table = topics()
    sizes = {k: len(v.encode("utf-8")) for k, v in table.items()}
    budget = TEST_FRACTION * sum(sizes.values())
    test, held = set(), 0
    for key in sorted(table, key=_hash_key):
        if held >= budget:
            break
        test.add(key)
        held += sizes[key]
    return sorted(k for k in table if (k in test) == (split == "test"))


def token_stream(split: str) -> torch.Tensor:
    """The split as one 1-D int64 token stream: each topic (sorted by key) as BOS, its bytes, EOS.

    Decoded once per process; each call returns a fresh copy.

    Example:
        >>> from pyobc.corpus import token_stream
        >>> token_stream("train").numel() > 5 * token_stream("test").numel()   # about 88% / 12%
        True
    """
    _check_split(split)
    with _lock:
        if split not in _streams:
            tok, table = ByteTokenizer(), topics()
            parts = [tok.encode(table[k], bos=True, eos=True) for k in split_topics(split)]
            _streams[split] = torch.cat(parts)
        return _streams[split].clone()
