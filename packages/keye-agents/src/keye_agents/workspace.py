"""File tools confined to the agent's workspace folder.

Why so strict: paths come from the model. Absolute paths, ``..`` components and symbolic links anywhere
along the path are refused outright (a link could point anywhere, including at a path the sandbox made),
and the final open uses O_NOFOLLOW, so a tool call can only touch files that really live in the folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from keye_agents.tools import Tool, ToolContext, ToolError, build_tool

MAX_READ_CHARS = 100_000


class Workspace:
    """A folder the agent's file tools may read and write, and nothing outside it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def resolve(self, path: str) -> Path:
        """Map a relative path to a location inside the workspace, or raise ToolError saying why not."""
        if not isinstance(path, str) or not path.strip() or "\x00" in path:
            raise ToolError(f"path must be a non-empty relative path inside the workspace, got {path!r}")
        pure = PurePosixPath(path)
        if pure.is_absolute() or path.startswith("~"):
            raise ToolError(
                f"refused {path!r}: absolute paths are not allowed; use a path relative to the workspace"
            )
        if ".." in pure.parts:
            raise ToolError(f"refused {path!r}: '..' would leave the workspace")
        current = self.root
        for part in pure.parts:
            if part == ".":
                continue
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                break
            if stat.S_ISLNK(mode):
                raise ToolError(f"refused {path!r}: {current.relative_to(self.root)} is a symbolic link")
        return self.root.joinpath(*[p for p in pure.parts if p != "."])

    def read(self, path: str, offset: int = 0, limit: int = MAX_READ_CHARS) -> str:
        target = self.resolve(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ToolError(f"no file {path!r} in the workspace") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a folder; use list_files" if stat.S_ISDIR(mode) else "not a regular file"
            raise ToolError(f"{path!r} is {kind}")
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
        chunk = text[offset : offset + limit]
        if offset + limit < len(text):
            chunk += f"\n[... {len(text) - offset - limit} more characters; read again with offset]"
        return chunk

    def write(self, path: str, content: str, append: bool = False) -> str:
        target = self.resolve(path)
        if target == self.root:
            raise ToolError("cannot write to the workspace folder itself; give a file name")
        self.resolve(str(PurePosixPath(path).parent))  # re-check parents after mkdir
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
        try:
            fd = os.open(target, flags, 0o644)
        except IsADirectoryError:
            raise ToolError(f"{path!r} is a folder") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        return f"wrote {len(content.encode())} bytes to {target.relative_to(self.root)}"

    def list(self, path: str = ".", recursive: bool = False) -> list[str]:
        base = self.resolve(path)
        if not base.is_dir():
            raise ToolError(f"no folder {path!r} in the workspace")
        entries = []
        walker = os.walk(base) if recursive else [(str(base), *_split(base))]
        for root, dirs, files in walker:
            dirs.sort()
            rel = Path(root).relative_to(self.root)
            entries += [f"{(rel / d).as_posix()}/" for d in dirs]
            entries += [(rel / f).as_posix() for f in sorted(files)]
        return entries


def _split(folder: Path) -> tuple[list[str], list[str]]:
    dirs, files = [], []
    for entry in folder.iterdir():
        (dirs if entry.is_dir() and not entry.is_symlink() else files).append(entry.name)
    return sorted(dirs), sorted(files)


def file_tools(ctx: ToolContext) -> dict[str, Tool]:
    """read_file, write_file and list_files bound to ``ctx.workspace``."""
    ws = Workspace(ctx.workspace)

    def read_file(path: str, offset: int = 0, limit: int = 20_000) -> str:
        """Read a text file from the workspace.

        Args:
            path: path relative to the workspace.
            offset: first character to return.
            limit: most characters to return.
        """
        return ws.read(path, offset, limit)

    def write_file(path: str, content: str, append: bool = False) -> str:
        """Write (or append to) a text file in the workspace, creating folders as needed.

        Args:
            path: path relative to the workspace.
            content: the text to write.
            append: add to the end instead of replacing the file.
        """
        return ws.write(path, content, append)

    def list_files(path: str = ".", recursive: bool = False) -> str:
        """List files and folders (folders end with /) in the workspace.

        Args:
            path: folder relative to the workspace.
            recursive: include everything below it.
        """
        return "\n".join(ws.list(path, recursive)) or "(empty)"

    return {fn.__name__: build_tool(fn) for fn in (read_file, write_file, list_files)}
