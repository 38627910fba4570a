import importlib.metadata

import pluggy
import pytest

from keye_agents import PluginError, load_plugins, tool

hookimpl = pluggy.HookimplMarker("keye")


@tool
def shout(text: str) -> str:
    """Upper-case text."""
    return text.upper()


def make_plugin(tools):
    class P:
        @hookimpl
        def keye_agent_tools(self):
            return tools

    return P()


def test_builtin_plugin_provides_tools_backends_and_search(monkeypatch):
    monkeypatch.delenv("KEYE_PLUGINS")  # every installed keye plugin loads beside ours without conflict
    plugins = load_plugins()
    assert {"python", "search", "read_file", "write_file", "list_files"} <= set(plugins.tools())
    assert {"openai", "local", "scripted"} <= set(plugins.backends())
    assert "local" in plugins.search_backends()
    assert plugins.origins["keye-agents"].startswith("keye-agents ")


def test_a_name_registered_twice_names_both_plugins():
    pair = [("first", make_plugin({"shout": shout})), ("second", make_plugin({"shout": shout}))]
    plugins = load_plugins(pair, entry_points=False)
    with pytest.raises(
        PluginError, match=r"'shout' is registered twice, by plugin 'first' and by plugin 'second'"
    ):
        plugins.tools()


def test_a_hook_returning_a_non_dict_is_named():
    plugins = load_plugins([("odd", make_plugin(["shout"]))], entry_points=False)
    with pytest.raises(PluginError, match="plugin 'odd': keye_agent_tools"):
        plugins.tools()


def fake_entry_points(*eps):
    def entry_points(group=None):
        return [ep for ep in eps if ep.group == group]

    return entry_points


def test_import_failure_names_the_plugin(monkeypatch):
    monkeypatch.delenv("KEYE_PLUGINS")
    broken = importlib.metadata.EntryPoint("brokenplug", "no_such_module_for_keye_tests", "keye")
    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points(broken))
    with pytest.raises(
        PluginError, match=r"keye plugin 'brokenplug' .*failed to import: ModuleNotFoundError"
    ):
        load_plugins()


def test_keye_plugins_restricts_what_loads(monkeypatch):
    broken = importlib.metadata.EntryPoint("brokenplug", "no_such_module_for_keye_tests", "keye")
    ours = importlib.metadata.EntryPoint("keye-agents", "keye_agents.builtin_plugin", "keye")
    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points(broken, ours))
    monkeypatch.setenv("KEYE_PLUGINS", " keye-agents , ")
    assert "python" in load_plugins().tools()
    monkeypatch.setenv("KEYE_PLUGINS", "somethingelse")
    assert load_plugins().tools() == {}
