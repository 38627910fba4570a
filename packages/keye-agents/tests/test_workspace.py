import pytest

from keye_agents import ToolContext, ToolError, Workspace
from keye_agents.workspace import file_tools


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "secret.txt").write_text("outside")
    return Workspace(tmp_path / "ws")


def test_write_read_list_inside_the_workspace(ws):
    assert ws.write("notes/a.txt", "hello\n") == "wrote 6 bytes to notes/a.txt"
    ws.write("notes/a.txt", "more", append=True)
    assert ws.read("notes/a.txt") == "hello\nmore"
    assert ws.read("./notes/a.txt", offset=6, limit=2).startswith("mo\n[... 2 more characters")
    assert ws.list() == ["notes/"]
    assert ws.list(".", recursive=True) == ["notes/", "notes/a.txt"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../secret.txt", "'..' would leave the workspace"),
        ("notes/../../secret.txt", "'..' would leave the workspace"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("~/x", "absolute paths are not allowed"),
        ("", "non-empty relative path"),
        ("a\x00b", "non-empty relative path"),
    ],
)
def test_escaping_paths_are_refused(ws, path, reason):
    for attempt in (lambda: ws.read(path), lambda: ws.write(path, "x"), lambda: ws.list(path)):
        with pytest.raises(ToolError, match=reason.replace("(", r"\(")):
            attempt()


def test_symlinks_are_refused_anywhere_in_the_path(ws, tmp_path):
    (ws.root / "file_link").symlink_to(tmp_path / "secret.txt")
    (ws.root / "dir_link").symlink_to(tmp_path)
    (ws.root / "dangling").symlink_to(tmp_path / "new.txt")
    for path in ("file_link", "dir_link/secret.txt", "dangling"):
        with pytest.raises(ToolError, match="is a symbolic link"):
            ws.read(path)
        with pytest.raises(ToolError, match="is a symbolic link"):
            ws.write(path, "pwned")
    assert (tmp_path / "secret.txt").read_text() == "outside"
    assert not (tmp_path / "new.txt").exists()


def test_tools_report_missing_files_and_folders(ws):
    tools = file_tools(ToolContext(ws.root))
    with pytest.raises(ToolError, match="no file 'nope.txt'"):
        tools["read_file"]({"path": "nope.txt"})
    ws.write("d/x.txt", "1")
    with pytest.raises(ToolError, match="is a folder"):
        tools["read_file"]({"path": "d"})
    assert tools["list_files"]({"path": "d"}) == "d/x.txt"
    assert tools["write_file"]({"path": "y.txt", "content": "hey"}) == "wrote 3 bytes to y.txt"
