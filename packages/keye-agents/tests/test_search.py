import pluggy
import pytest

from keye_agents import LocalSearch, SearchHit, ToolContext, load_plugins
from keye_agents.search import search_tool

hookimpl = pluggy.HookimplMarker("keye")


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "geo.md").write_text(
        "# Geography\n\nThe capital of Freedonia is Fredville.\nFredville has twelve bridges.\n"
        + "filler line\n" * 30
        + "The Freedonian river is called the Slow.\n"
    )
    (tmp_path / "food.txt").write_text("Freedonian cuisine loves dumplings.\nDumplings are steamed.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    return tmp_path


def test_bm25_ranks_the_right_passage_with_line_citations(docs):
    hits = LocalSearch(docs).search("capital of Freedonia", k=3)
    assert hits[0].source == "geo.md" and "Fredville" in hits[0].text
    assert hits[0].citation == "geo.md:1-12"
    assert all(h.score > 0 for h in hits)
    river = LocalSearch(docs).search("river", k=1)[0]
    assert river.first_line <= 35 <= river.last_line and river.text.endswith("called the Slow.")
    assert LocalSearch(docs).search("dumplings steamed", k=1)[0].citation == "food.txt:1-2"
    assert LocalSearch(docs).search("steaming dumpling", k=1)[0].citation == "food.txt:1-2"  # stemmed


def test_no_match_and_empty_collection_give_no_results(docs, tmp_path):
    assert LocalSearch(docs).search("zebra quantum", k=3) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert LocalSearch(empty).search("anything") == []
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        LocalSearch(tmp_path / "missing")


def test_search_tool_numbers_hits_for_citation(docs):
    tool = search_tool(ToolContext(docs, {"docs": str(docs)}, load_plugins().search_backends()))
    out = tool({"query": "bridges Fredville", "k": 2})
    assert out.startswith("[1] geo.md:1-12 (score ")
    assert out.endswith("Cite passages as [n] with their source.")


class FakeWeb:
    def __init__(self, ctx):
        self.ctx = ctx

    def search(self, query, k):
        return [SearchHit("https://example.org/a", f"web result for {query}", 1.0)][:k]


class WebPlugin:
    @hookimpl
    def keye_agent_search_backends(self):
        return {"web": FakeWeb}


def test_a_plugin_search_backend_plugs_into_the_search_tool(tmp_path):
    plugins = load_plugins([("webplugin", WebPlugin())])
    tool = search_tool(ToolContext(tmp_path, {"search_backend": "web"}, plugins.search_backends()))
    assert tool({"query": "keye"}).startswith("[1] https://example.org/a (score 1.00)\nweb result for keye\n")
