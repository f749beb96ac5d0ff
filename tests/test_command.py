"""The `vlrm` command: built-in subcommands, plugin subcommands, one way to fail."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlrm.command import main
from vlrm.plugins import reset_registry

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAST = ["--trainer.max_steps=2", "--trainer.save_every=0", "--trainer.progress=false"]


@pytest.fixture(autouse=True)
def fresh_registry():
    reset_registry()
    yield
    for var in ("VLRM_PLUGINS", "VLRM_BLOCK_PLUGINS"):
        os.environ.pop(var, None)
    reset_registry()


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which(name, path=str(BIN))
    assert exe, f"console script {name} is not installed beside {sys.executable}"
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


@pytest.mark.slow
def test_vlrm_run_and_vlrm_minus_run_give_identical_runs(tmp_path, monkeypatch):
    one = _script("vlrm", "run", "--config", "configs/tiny.yaml", *FAST,
                  f"--output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    # `vlrm-run`'s entry point, in this process (tests/test_end_to_end.py runs the script)
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vlrm-run"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["vlrm-run", "--config", "configs/tiny.yaml", *FAST,
                                      f"--output_dir={tmp_path / 'two'}"])
    with pytest.raises(SystemExit) as done:
        script.load()()
    assert done.value.code == 0
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two")
    assert (tmp_path / "one" / "config.yaml").read_text().replace("one", "two") == \
           (tmp_path / "two" / "config.yaml").read_text()


def test_help_lists_the_builtin_and_plugin_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("run", "eval", "export", "plugins", "serve-reward", "shapes"):
        assert f"\n  {name} " in out, name


def test_an_unknown_command_exits_2_naming_the_commands(capsys):
    assert main(["trian", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no command 'trian'" in err and "run, eval, export, plugins" in err


def test_a_bad_config_exits_2_with_one_paragraph_in_every_config_command(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    for command in ("run", "eval", "serve-reward"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--config", str(bad)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vlrm-{command}: error:") and str(bad) in err
        assert "Traceback" not in err


def test_plugin_flags_before_the_command_choose_the_plugins(capsys):
    assert main(["--block-plugins", "shapes", "plugins"]) == 0
    listing = capsys.readouterr().out
    assert "BLOCKED by VLRM_BLOCK_PLUGINS / --block-plugins (shapes)" in listing
    reset_registry()
    assert main(["--help"]) == 0
    assert "\n  shapes " not in capsys.readouterr().out  # its plugin registers it


def test_the_shapes_world_adds_its_command_through_the_hook(capsys):
    assert main(["shapes"]) == 2  # no subcommand: its usage, as vlrm-shapes
    assert "usage: vlrm-shapes {build,continue,itm,llava,vlm_judge,demo,sweep}" in capsys.readouterr().err


def test_bad_arguments_exit_2_with_one_paragraph_in_every_builtin_command(capsys):
    """The commands without a config (export, plugins) fail as run and eval do: exit 2, one
    paragraph naming the command, no usage dump, no traceback."""
    for argv, says in ((["export", "run_dir", "--bogus"], "unrecognized arguments: --bogus"),
                       (["export"], "the following arguments are required: checkpoint"),
                       (["plugins", "--bogus"], "unrecognized arguments: --bogus"),
                       (["run", "--bogus"], "bogus")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2, argv
        lines = err.strip().splitlines()  # one paragraph: the error, then where to look
        assert says in lines[0] and len(lines) == 2 and "--help" in lines[1], (argv, err)
        assert "usage:" not in err
        assert "Traceback" not in err
