"""Search over a local document collection with BM25 (``bm25s``, Snowball stemming), returning passages
with citations.

Why passages: an agent needs to cite where an answer came from, so documents are split into windows
of lines and every hit carries ``source:first-last`` line numbers. Other backends (web search) plug in
through the ``keye_agent_search_backends`` hook and return the same ``SearchHit``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from keye_agents.tools import Tool, ToolContext, ToolError, build_tool

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".csv", ".html")


@dataclass(frozen=True)
class SearchHit:
    source: str  # a path relative to the collection, or a URL
    text: str
    score: float
    first_line: int = 0
    last_line: int = 0

    @property
    def citation(self) -> str:
        return f"{self.source}:{self.first_line}-{self.last_line}" if self.first_line else self.source


class LocalSearch:
    """BM25 over passages of ``passage_lines`` lines (half-overlapping) of the text files under ``root``."""

    def __init__(
        self, root: str | os.PathLike, *, passage_lines: int = 12, suffixes: Sequence[str] = TEXT_SUFFIXES
    ):
        import bm25s
        import Stemmer

        if passage_lines < 2:
            raise ValueError(f"passage_lines must be at least 2, got {passage_lines}")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"search collection {self.root} is not a folder")
        self.passages: list[SearchHit] = []
        step = passage_lines // 2
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            rel = path.relative_to(self.root).as_posix()
            for start in range(0, max(len(lines) - step, 1), step):
                chunk = lines[start : start + passage_lines]
                if any(line.strip() for line in chunk):
                    self.passages.append(SearchHit(rel, "\n".join(chunk), 0.0, start + 1, start + len(chunk)))
        self._bm25s = bm25s
        self._stemmer = Stemmer.Stemmer("english")  # Snowball: "refunds" finds "refund"
        self._index = None
        if self.passages:
            self._index = bm25s.BM25()
            texts = [f"{p.source}\n{p.text}" for p in self.passages]
            tokens = bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, show_progress=False)
            self._index.index(tokens, show_progress=False)

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        if self._index is None or not query.strip():
            return []
        tokens = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens[0]:
            return []
        tokens = [self._stemmer.stemWords(tokens[0])]
        k = min(k, len(self.passages))
        ids, scores = self._index.retrieve(tokens, k=k, show_progress=False)
        hits = []
        for i, score in zip(ids[0], scores[0]):
            if score > 0:
                p = self.passages[int(i)]
                hits.append(SearchHit(p.source, p.text, float(score), p.first_line, p.last_line))
        return hits


def local_search_backend(ctx: ToolContext) -> LocalSearch:
    """The built-in backend: ``docs`` option (a folder), else the workspace."""
    return LocalSearch(ctx.options.get("docs") or ctx.workspace)


def format_hits(hits: Sequence[SearchHit]) -> str:
    if not hits:
        return "no results"
    blocks = [f"[{n}] {h.citation} (score {h.score:.2f})\n{h.text}" for n, h in enumerate(hits, 1)]
    return "\n\n".join(blocks) + "\n\nCite passages as [n] with their source."


def search_tool(ctx: ToolContext) -> Tool:
    """The ``search`` tool over the backend named by the ``search_backend`` option (default ``local``)."""
    name = ctx.options.get("search_backend", "local")
    factories = ctx.search_backends
    if name not in factories:
        raise ToolError(f"no search backend {name!r}; available: {', '.join(sorted(factories)) or 'none'}")
    backend = None

    def search(query: str, k: int = 5) -> str:
        """Search the document collection; returns numbered passages with their source and lines.

        Args:
            query: keywords to look for.
            k: how many passages to return (1-20).
        """
        nonlocal backend
        if not 1 <= k <= 20:
            raise ToolError(f"k must be between 1 and 20, got {k}")
        backend = backend or factories[name](ctx)  # built on first use: indexing can take a while
        return format_hits(backend.search(query, k))

    return build_tool(search)
