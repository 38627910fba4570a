"""Plugin wiring (DESIGN §2): entry points, registries, duplicate names, KEYE_PLUGINS, bad plugins,
and an out-of-tree distribution discovered and used with no change to Keye."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pluggy
import pytest
import torch

from keye_moe import hookspecs
from keye_moe.hookspecs import AttentionInputs
from keye_moe.plugins import PluginError, PluginHost, allowed_plugin_names
from keye_moe.registry import attention_backends, make_attention_backend

FIXTURE = Path(__file__).parent / "fixtures" / "keye_toy_attention"
hookimpl = pluggy.HookimplMarker("keye")


def _plugin(name: str, components: dict) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def keye_attention_backends():
        return components

    module.keye_attention_backends = keye_attention_backends
    return module


def _run(code: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_sdpa_is_registered_by_keye_moe_entry_point():
    assert "sdpa" in attention_backends()
    from keye_moe.registry import plugin_host

    info = {p.name: p for p in plugin_host().plugins()}["keye-moe"]
    assert info.distribution == "keye-moe"
    assert info.version == "0.1.0"
    assert "keye_attention_backends" in info.hooks


def test_registry_merges_plugins_by_name():
    host = PluginHost(hookspecs, load_entry_points=False)
    host.register(_plugin("a", {"one": dict}), name="a")
    host.register(_plugin("b", {"two": list}), name="b")
    assert host.registry("keye_attention_backends") == {"one": dict, "two": list}


def test_duplicate_component_name_names_both_plugins():
    host = PluginHost(hookspecs, load_entry_points=False)
    host.register(_plugin("first", {"sdpa": dict}), name="first-plugin")
    host.register(_plugin("second", {"sdpa": list}), name="second-plugin")
    with pytest.raises(PluginError, match=r"'sdpa'.*'first-plugin'.*'second-plugin'"):
        host.registry("keye_attention_backends")


def test_non_dict_and_non_callable_are_refused():
    host = PluginHost(hookspecs, load_entry_points=False)
    module = types.ModuleType("bad")
    module.keye_attention_backends = hookimpl(lambda: ["sdpa"])
    host.register(module, name="listy")
    with pytest.raises(PluginError, match="'listy'.*expected a dict"):
        host.registry("keye_attention_backends")
    host = PluginHost(hookspecs, load_entry_points=False)
    host.register(_plugin("c", {"x": 3}), name="three")
    with pytest.raises(PluginError, match="'three'.*non-callable"):
        host.registry("keye_attention_backends")


def test_unknown_backend_lists_available_names():
    with pytest.raises(PluginError, match=r"no attention backend named 'nope'; available: .*sdpa"):
        make_attention_backend("nope", None)


def test_keye_plugins_env_parsing(monkeypatch):
    monkeypatch.delenv("KEYE_PLUGINS", raising=False)
    assert allowed_plugin_names() is None
    monkeypatch.setenv("KEYE_PLUGINS", " keye-moe, dsa ,")
    assert allowed_plugin_names() == {"keye-moe", "dsa"}


def test_keye_plugins_restricts_loading():
    result = _run(
        """
        from keye_moe.registry import plugin_host
        print(sorted(p.name for p in plugin_host().plugins()))
        """,
        env={"KEYE_PLUGINS": "keye-moe"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['keye-moe']"
    result = _run(
        "from keye_moe.registry import attention_backends; print(sorted(attention_backends()))",
        env={"KEYE_PLUGINS": "dsa"},
    )
    assert "sdpa" not in result.stdout


def _fake_distribution(site: Path, name: str, entry_points: str) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_plugin_import_error_names_the_plugin(tmp_path):
    _fake_distribution(tmp_path, "broken_plugin", "[keye]\nbroken = no_such_module_for_keye\n")
    result = _run(
        "from keye_moe.registry import attention_backends; attention_backends()",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "keye plugin 'broken' from broken_plugin 1.0 failed to load 'no_such_module_for_keye'" in (
        result.stderr
    )
    cli = subprocess.run(
        [sys.executable, "-m", "keye_train.cli", "plugins"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        timeout=120,
    )
    assert cli.returncode == 2
    assert "keye plugin 'broken'" in cli.stderr


def test_two_distributions_claiming_one_entry_point(tmp_path):
    _fake_distribution(tmp_path, "one_dist", "[keye]\nclash = json\n")
    _fake_distribution(tmp_path, "two_dist", "[keye]\nclash = csv\n")
    result = _run(
        "from keye_moe.registry import attention_backends; attention_backends()",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "'clash'" in result.stderr and "one_dist" in result.stderr and "two_dist" in result.stderr


@pytest.fixture(scope="module")
def toy_site(tmp_path_factory) -> Path:
    """Builds and installs the out-of-tree fixture distribution into a private folder."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(site), str(FIXTURE)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    return site


def test_out_of_tree_plugin_is_discovered_and_used(toy_site):
    env = {"PYTHONPATH": str(toy_site)}
    cli = subprocess.run(
        [sys.executable, "-m", "keye_train.cli", "plugins"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    row = next(line for line in cli.stdout.splitlines() if line.startswith("toy-attention"))
    assert row.split()[:3] == ["toy-attention", "keye-toy-attention", "0.3.1"]
    registry_line = next(
        line for line in cli.stdout.splitlines() if line.startswith("keye_attention_backends:")
    )
    assert {"sdpa", "toy"} <= set(registry_line.split(":")[1].replace(",", " ").split())
    result = _run(
        """
        import json, torch
        from keye_moe import DecoderConfig, KeyeMoeForCausalLM
        from keye_toy_attention.plugin import CALLS
        torch.manual_seed(0)
        config = DecoderConfig.preset("tiny", attn_implementation="toy")
        toy = KeyeMoeForCausalLM(config).eval()
        dense = KeyeMoeForCausalLM(DecoderConfig.preset("tiny", attn_implementation="sdpa")).eval()
        dense.load_state_dict(toy.state_dict())
        ids = torch.randint(0, config.vocab_size, (2, 9))
        with torch.no_grad():
            err = (toy(ids).logits - dense(ids).logits).abs().max().item()
        print(json.dumps({"calls": CALLS["attention"], "layers": config.num_hidden_layers, "err": err}))
        """,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["calls"] == report["layers"]  # the decoder routed every layer through the plugin
    assert report["err"] < 1e-4


def test_toy_plugin_absent_without_its_install():
    assert "toy" not in attention_backends()


def test_attention_inputs_defaults():
    inputs = AttentionInputs(
        hidden_states=torch.zeros(1, 2, 4), position_ids=torch.arange(2)[None], scale=1.0
    )
    assert inputs.cu_seqlens is None and inputs.cache is None and inputs.aux_losses is None
