"""Components named in configs by their registered names; plugins chosen and blocked."""

import json
import os
from pathlib import Path

import pytest
import yaml

from vlrm import hookimpl
from vlrm.cli import plugins, run
from vlrm.plugins import PluginError, Selection, load_plugins, reset_registry

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
NAMES = str(ROOT / "configs" / "tiny_names.yaml")
EXAMPLE = str(ROOT / "examples" / "reward_plugin" / "tiny_with_length.yaml")
FAST = ["--trainer.max_steps=2", "--trainer.save_every=0", "--trainer.progress=false"]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    for var in ("VLRM_PLUGINS", "VLRM_BLOCK_PLUGINS", "VLRM_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)
    reset_registry()
    yield
    for var in ("VLRM_PLUGINS", "VLRM_BLOCK_PLUGINS"):  # set by --plugins / --block-plugins
        os.environ.pop(var, None)  # (not monkeypatch: it would put the flag's value back)
    reset_registry()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _exit(argv, capsys) -> tuple[int, str]:
    try:
        status = run(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def test_a_config_of_registered_names_trains_exactly_as_the_dotted_one(tmp_path):
    named = yaml.safe_load(Path(NAMES).read_text())
    assert all("." not in c for c in (named["policy"]["class_path"], named["data"]["class_path"],
                                       named["objective"]["class_path"],
                                       named["reward"]["terms"]["clip"]["reward"]["class_path"]))
    assert run(["--config", NAMES, *FAST, f"--output_dir={tmp_path / 'names'}"]) == 0
    assert run(["--config", TINY, *FAST, f"--output_dir={tmp_path / 'paths'}"]) == 0
    names, paths = _rows(tmp_path / "names"), _rows(tmp_path / "paths")
    drop = ("time/", "perf/")
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in names] == \
           [{k: v for k, v in r.items() if not k.startswith(drop)} for r in paths]
    saved = yaml.safe_load((tmp_path / "names" / "config.yaml").read_text())
    assert saved["policy"]["class_path"] == "vlrm_plugins.blip2_opt.tiny_blip2_opt"
    assert saved["objective"]["class_path"] == "vlrm.objective.A2C"


def test_a_third_party_reward_trains_by_its_registered_name(tmp_path):
    assert "class_path: caption_length" in Path(EXAMPLE).read_text()
    out = tmp_path / "run"
    assert run(["--config", TINY, "--config", EXAMPLE, *FAST, f"--output_dir={out}"]) == 0
    assert {"reward/length", "reward/clip"} <= set(_rows(out)[0])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward"]["terms"]["length"]["reward"]["class_path"] == \
        "vlrm_example_reward.reward.CaptionLengthReward"


def test_a_name_on_the_command_line_resolves(tmp_path):
    out = tmp_path / "run"
    assert run(["--config", TINY, "--objective.class_path=grpo", *FAST, f"--output_dir={out}"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["class_path"] == "vlrm_plugins.estimators.GRPO"


def test_an_unknown_name_exits_2_listing_the_registered_ones(capsys):
    status, err = _exit(["--config", TINY, "--policy.class_path=tiny_blip2_opx"], capsys)
    assert status == 2
    assert "'tiny_blip2_opx' is neither a registered name nor a dotted path" in err
    assert "tiny_blip2_opt" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["name", "path"])
def test_a_blocked_plugins_component_is_refused_by_name_and_by_path(how, tmp_path, capsys):
    config = NAMES if how == "name" else TINY  # its clip term: tiny_clip / the dotted path
    status, err = _exit(["--block-plugins", "clip", "--config", config,
                         *FAST, f"--output_dir={tmp_path}"], capsys)
    assert status == 2, err
    assert "clip" in err and "Traceback" not in err
    if how == "name":
        assert "Blocked plugins, whose names are not registered: clip" in err
    else:
        assert "belongs to a blocked plugin: plugin 'clip' (vlrm)" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_autoload_off_refuses_a_third_party_path_as_well(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VLRM_DISABLE_PLUGIN_AUTOLOAD", "1")
    status, err = _exit(["--config", TINY,
                         '--reward.terms.clip.reward={"class_path": '
                         '"vlrm_example_reward.CaptionLengthReward"}',
                         *FAST, f"--output_dir={tmp_path}"], capsys)
    assert status == 2 and "belongs to a blocked plugin: plugin 'example_reward'" in err


def test_only_the_named_plugins_load():
    registry = load_plugins(selection=Selection(only=frozenset({"clip", "blip2_opt"})))
    assert set(registry.components["rewards"]) == {"clip", "tiny_clip"}
    assert set(registry.components["policies"]) == {"blip2_opt", "tiny_blip2_opt"}
    blocked = {p.name for p in registry.blocked}
    assert {"example_reward", "shapes", "estimators"} <= blocked
    assert "vlrm_shapes.world" in registry.denied
    assert "vlrm_example_reward" in registry.denied  # that distribution is left out whole
    assert not any(d == "vlrm" or d.startswith("vlrm.") for d in registry.denied)


def test_a_selection_naming_no_installed_plugin_is_an_error():
    with pytest.raises(PluginError, match="no vlrm plugin or distribution is named 'clipp'"):
        load_plugins(selection=Selection(block=frozenset({"clipp"})))


def test_a_name_registered_for_two_kinds_needs_the_dotted_path():
    class Twin:
        @hookimpl
        def vlrm_register_evaluators(self):
            return {"tiny_clip": dict}

    registry = load_plugins(autoload=False, extra=[("twin", Twin())])
    assert registry.resolve("tiny_clip", ["rewards"]).path == "vlrm_plugins.clip_reward.tiny_clip_reward"
    with pytest.raises(PluginError, match="'tiny_clip' is registered twice"):
        registry.resolve("tiny_clip")


def test_vlrm_plugins_shows_a_components_name_path_and_init_arguments(capsys):
    assert plugins(["tiny_clip", "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["class_path"] == "vlrm_plugins.clip_reward.tiny_clip_reward"
    assert shown["kind"] == "rewards" and "seed" in shown["init_args"]
    assert plugins(["--block-plugins", "clip"]) == 0
    listing = capsys.readouterr().out
    assert "BLOCKED by VLRM_BLOCK_PLUGINS" in listing
    assert "tiny_blip2_opt (vlrm_plugins.blip2_opt.tiny_blip2_opt)" in listing
