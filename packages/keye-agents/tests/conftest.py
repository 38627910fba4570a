import pytest


@pytest.fixture(autouse=True)
def only_keye_agents_plugins(monkeypatch):
    """Tests see keye-agents' own plugin only, so work in progress in another package cannot break them;
    test_plugins checks loading every installed plugin on purpose."""
    monkeypatch.setenv("KEYE_PLUGINS", "keye-agents")
