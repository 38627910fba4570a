"""Keye's text tokenizer: a checkpoint's ``tokenizer.json``, or an embedded default built offline.

Why an embedded default: the tiny model, the tests and the demo must run with no download. It is a
byte-level BPE in the Qwen2/Qwen3 layout (NFC, the Qwen split regex, byte-level bytes), trained at first
use from ``assets/tokenizer_corpus.txt`` and cached on disk; training is deterministic, so every machine
builds the same vocabulary. Both kinds carry the Qwen3 / Keye special tokens, and ``KeyeTokenizer``
checks that they exist before anything is encoded with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS = ASSETS / "tokenizer_corpus.txt"

# The Qwen2/Qwen3 pre-tokenizer split (contractions, letters, single digits, punctuation runs, newlines).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special): Qwen3's added tokens in their released order, then Keye's video markers.
# "special" tokens are dropped when decoding a reply; the others (tool calls, thinking) are text.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<|frame|>", True),
    ("<|fast_start|>", True),
    ("<|fast_end|>", True),
)
REQUIRED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|frame|>",
    "<|fast_start|>",
    "<|fast_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

DEFAULT_VOCAB_SIZE = 2048  # the embedded tokenizer's size, specials included (the tiny preset's vocab)
DEFAULT_TOKENIZER_VERSION = 1  # bump when the recipe changes, so stale caches are never reused


def default_special_id(token: str) -> int:
    """A special token's id in the embedded tokenizer (specials follow the BPE ids, in order)."""
    names = [t for t, _ in SPECIAL_TOKENS]
    if token not in names:
        raise KeyError(f"{token!r} is not one of Keye's special tokens")
    return DEFAULT_VOCAB_SIZE - len(SPECIAL_TOKENS) + names.index(token)


def cache_dir() -> Path:
    """Where built artefacts live: ``$KEYE_CACHE`` or ``~/.cache/keye``."""
    return Path(os.environ.get("KEYE_CACHE", Path.home() / ".cache" / "keye"))


def train_default_tokenizer(corpus: Path = CORPUS, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the embedded byte-level BPE from ``corpus``: exactly ``vocab_size`` ids, specials last."""
    n_regular = vocab_size - len(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Whole paragraphs, not lines, so that newline runs ("\n\n") get merges as in chat text.
    paragraphs = [p + "\n\n" for p in corpus.read_text(encoding="utf-8").split("\n\n")]
    tokenizer.train_from_iterator(paragraphs, trainer)
    if tokenizer.get_vocab_size() != n_regular:
        raise RuntimeError(
            f"the tokenizer corpus {corpus} yields only {tokenizer.get_vocab_size()} BPE tokens; "
            f"{n_regular} are needed for a {vocab_size}-token vocabulary (add text to the corpus)"
        )
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    return tokenizer


def default_tokenizer_path() -> Path:
    """The cache file for the embedded tokenizer, keyed by the corpus and the recipe."""
    digest = hashlib.sha256(CORPUS.read_bytes())
    digest.update(f"v{DEFAULT_TOKENIZER_VERSION}-{DEFAULT_VOCAB_SIZE}".encode())
    return cache_dir() / "tokenizers" / f"keye-default-{digest.hexdigest()[:16]}.json"


def default_tokenizer() -> Tokenizer:
    """The embedded tokenizer, trained once per corpus version and then read from the cache."""
    path = default_tokenizer_path()
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = train_default_tokenizer()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(tokenizer.to_str())
    os.replace(tmp.name, path)  # atomic: concurrent first uses never read a half-written file
    return tokenizer


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the processor and the model rely on."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    frame: int
    fast_start: int
    fast_end: int


class KeyeTokenizer:
    """A ``tokenizers.Tokenizer`` plus the Keye special-token ids, checked once at construction."""

    def __init__(self, tokenizer: Tokenizer, *, source: str = "(in memory)", add_missing: bool = False):
        self.backend = tokenizer
        self.source = source
        missing = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
        if missing and add_missing:
            # e.g. a plain Qwen3 tokenizer: append Keye's video markers after its vocabulary
            specials = dict(SPECIAL_TOKENS)
            tokenizer.add_tokens([AddedToken(t, special=specials[t], normalized=False) for t in missing])
            log.warning(
                "added %s to the tokenizer from %s (ids from %d): the model's embeddings must cover them",
                missing,
                source,
                tokenizer.token_to_id(missing[0]),
            )
        elif missing:
            raise ValueError(
                f"tokenizer from {source} lacks Keye's special tokens {missing}; add them to its "
                "tokenizer.json (added_tokens), load it with add_missing=True, or use KeyeTokenizer.default()"
            )
        tid = tokenizer.token_to_id
        self.ids = SpecialIds(
            endoftext=tid("<|endoftext|>"),
            im_start=tid("<|im_start|>"),
            im_end=tid("<|im_end|>"),
            vision_start=tid("<|vision_start|>"),
            vision_end=tid("<|vision_end|>"),
            image_pad=tid("<|image_pad|>"),
            video_pad=tid("<|video_pad|>"),
            frame=tid("<|frame|>"),
            fast_start=tid("<|fast_start|>"),
            fast_end=tid("<|fast_end|>"),
        )

    @classmethod
    def default(cls) -> KeyeTokenizer:
        return cls(default_tokenizer(), source="the embedded default")

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, add_missing: bool = False) -> KeyeTokenizer:
        """Load ``tokenizer.json`` (or a checkpoint directory holding one); ``add_missing`` appends any
        Keye special token the file lacks instead of refusing it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        return cls(Tokenizer.from_file(str(path)), source=str(path), add_missing=add_missing)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and the character span of each token in ``text``."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def to_json(self) -> dict:
        return json.loads(self.backend.to_str())
