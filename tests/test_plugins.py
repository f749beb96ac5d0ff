import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from vlrm import hookimpl, hookspecs
from vlrm.plugins import PluginError, get_registry, load_plugins, reset_registry

BUILTIN = {
    "policies": {"blip2_opt", "tiny_blip2_opt"},
    "rewards": {"clip", "tiny_clip"},
    "datasets": {"image_folder", "bundled_photos"},
}


def make_distribution(root, name, entry_points, modules=None):
    """A real installed distribution on sys.path: a .dist-info folder plus its modules."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[vlrm]\n{lines}\n")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    reset_registry()


def test_builtins_register_through_the_vlrm_entry_points():
    registry = load_plugins(autoload=False)
    for kind, names in BUILTIN.items():
        assert names <= set(registry.components[kind]), kind
        for name in names:
            assert registry.components[kind][name].distribution == "vlrm"
    assert registry.get("rewards", "clip").path == "vlrm_plugins.clip_reward.clip_reward"
    assert {p.name for p in registry.plugins} >= {"blip2_opt", "clip", "bundled_photos"}


def test_third_party_plugin_is_found_and_can_be_disabled():
    on = load_plugins(autoload=True)
    assert on.get("rewards", "caption_length").distribution == "vlrm-example-reward"
    off = load_plugins(autoload=False)
    assert "caption_length" not in off.components["rewards"]


def test_disable_env_var(monkeypatch):
    monkeypatch.setenv("VLRM_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "caption_length" not in load_plugins().components["rewards"]
    monkeypatch.setenv("VLRM_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert "caption_length" in load_plugins().components["rewards"]


def test_unknown_component_lists_known_ones():
    with pytest.raises(KeyError, match="known: .*clip"):
        load_plugins(autoload=False).get("rewards", "nope")


def test_component_name_clash_names_both_packages(site):
    make_distribution(site, "vlrm-clashing", {"clashing": "clashing_plugin"}, {
        "clashing_plugin": """
            from vlrm import hookimpl
            @hookimpl
            def vlrm_register_rewards():
                return {"clip": object}
        """})
    with pytest.raises(PluginError) as err:
        load_plugins(autoload=True)
    assert "'clip'" in str(err.value)
    assert "'vlrm'" in str(err.value) and "'vlrm-clashing'" in str(err.value)


def test_in_process_plugin_clash():
    class Twin:
        @hookimpl
        def vlrm_register_policies(self):
            return {"blip2_opt": object}

    with pytest.raises(PluginError, match="two policies are named 'blip2_opt'"):
        load_plugins(autoload=False, extra=[("twin", Twin())])


def test_entry_point_name_used_by_two_distributions(site):
    make_distribution(site, "vlrm-squatter", {"clip": "squatter_plugin"},
                      {"squatter_plugin": "X = 1\n"})
    with pytest.raises(PluginError, match="'clip' is used by two distributions"):
        load_plugins(autoload=True)


def test_broken_plugin_is_reported_by_name_and_others_still_load(site):
    make_distribution(site, "vlrm-broken", {"broken": "broken_plugin"},
                      {"broken_plugin": "raise ImportError('missing dependency xyz')\n"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = load_plugins(autoload=True)
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "vlrm-broken" in m and "xyz" in m for m in messages), messages
    assert "clip" in registry.components["rewards"]  # unrelated plugins unaffected
    broken = [p for p in registry.plugins if p.name == "broken"]
    assert broken and "xyz" in broken[0].error


def test_raising_hook_is_reported_and_skipped(site):
    make_distribution(site, "vlrm-raising", {"raising": "raising_plugin"}, {
        "raising_plugin": """
            from vlrm import hookimpl
            @hookimpl
            def vlrm_register_rewards():
                raise RuntimeError("boom")
        """})
    with pytest.warns(RuntimeWarning, match="'raising'.*boom"):
        registry = load_plugins(autoload=True)
    assert "clip" in registry.components["rewards"]
    assert [p.error for p in registry.plugins if p.name == "raising"][0]


def test_registry_is_lazy_and_idempotent():
    reset_registry()
    first = get_registry()
    assert get_registry() is first
    reset_registry()
    assert get_registry() is not first


def test_importing_the_engine_loads_no_plugin_or_model_library():
    code = ("import sys, vlrm, vlrm.cli, vlrm.trainer, vlrm.plugins, vlrm.testing; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('vlrm_plugins', 'transformers', 'open_clip')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_hook_is_documented():
    hooks = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("vlrm_")]
    assert len(hooks) >= 3
    for hook in hooks:
        assert hook.__doc__ and "Returns:" in hook.__doc__, hook.__name__


def _plugins_cli(*args, **env):
    return subprocess.run([sys.executable, "-c", "from vlrm.cli import plugins_main; plugins_main()",
                           *args], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_vlrm_plugins_json_lists_builtins_and_the_example():
    out = _plugins_cli("--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["clip"]["distribution"] == "vlrm" and rows["clip"]["version"]
    assert set(rows["blip2_opt"]["components"]["policies"]) == BUILTIN["policies"]
    assert rows["example_reward"]["distribution"] == "vlrm-example-reward"
    assert rows["example_reward"]["components"] == {"rewards": ["caption_length"]}
    assert rows["example_reward"]["init_args"]["rewards"]["caption_length"] == {
        "target_words": "int = 10"}
    off = {row["name"]: row for row in json.loads(
        _plugins_cli("--json", VLRM_DISABLE_PLUGIN_AUTOLOAD="1").stdout)}
    assert off["example_reward"]["components"] == {}  # listed as left out, nothing registered
    assert "VLRM_DISABLE_PLUGIN_AUTOLOAD" in off["example_reward"]["blocked"]


def test_vlrm_plugins_table():
    out = _plugins_cli()
    assert out.returncode == 0
    assert "clip  (vlrm 0.1.0)" in out.stdout
    assert ("rewards: clip (vlrm_plugins.clip_reward.clip_reward), "
            "tiny_clip (vlrm_plugins.clip_reward.tiny_clip_reward)") in out.stdout


def test_the_shapes_world_is_its_own_package_using_only_public_names():
    """worlds/shapes is a separate distribution: the engine and the first-party plugins never
    name it, and it imports nothing private from them (as a third party would)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for folder in ("vlrm", "plugins"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "vlrm_shapes" not in text and "vlrm_plugins.shapes" not in text, path
    world = sorted((root / "worlds" / "shapes" / "vlrm_shapes").glob("*.py"))
    assert len(world) >= 6
    for path in world:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "vlrm", "vlrm_plugins"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and not any(part.startswith("_") for part in
                                               node.module.split(".")), (path.name, node.module,
                                                                         private)
