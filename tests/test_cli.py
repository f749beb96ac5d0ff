import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlrm.cli import build_parser, run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["--trainer.max_steps", "2", "--trainer.images_per_step", "2",
        "--trainer.samples_per_image", "2", "--trainer.progress", "false",
        "--policy.init_args.max_new_tokens", "6"]
TINY_OVERRIDES = ['--policy={"class_path": "vlrm_plugins.blip2_opt.tiny_blip2_opt"}',
                  '--reward.terms.clip.reward={"class_path": "vlrm_plugins.clip_reward.tiny_clip_reward"}']
REQUIRED_KEYS = {"step", "loss/policy", "loss/value", "reward/total", "reward/clip",
                 "caption/length", "time/step_s", "data/skipped"}


def run_exit(argv, capsys):
    """Exit status and stderr of an in-process vlrm-run."""
    try:
        status = run(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def test_bad_key_in_a_subprocess_exits_2_with_the_key_and_no_traceback():
    out = subprocess.run([sys.executable, "-m", "vlrm.cli", "--config", TINY,
                          "--trainer.max_stepz", "3"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "max_stepz" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 4


@pytest.mark.parametrize("extra, expected", [
    (["--trainer.max_steps", "abc"], "trainer.max_steps"),
    (["--reward.terms.clip.wieght", "2"], "wieght"),
    (["--policy.init_args.no_such_arg", "1"], "no_such_arg"),
])
def test_bad_values_exit_2_naming_the_key(extra, expected, capsys):
    status, err = run_exit(["--config", TINY, *extra], capsys)
    assert status == 2 and expected in err


def test_bad_key_in_a_config_file_names_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    status, err = run_exit(["--config", TINY, "--config", str(bad)], capsys)
    assert status == 2 and "max_stepz" in err and str(bad) in err


def test_missing_config_file(capsys):
    status, err = run_exit(["--config", "/nonexistent/cfg.yaml"], capsys)
    assert status == 2 and "/nonexistent/cfg.yaml" in err


def test_missing_image_folder_is_named_before_models_load(tmp_path, capsys):
    status, err = run_exit(["--config", TINY, "--data=vlrm.data.ImageFolder",
                            f"--data.root={tmp_path}/absent"], capsys)
    assert status == 2 and f"{tmp_path}/absent" in err and "Traceback" not in err


def test_print_config_builds_nothing(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["--config", TINY, "--reward.terms.clip.weight", "0.5", "--print_config"])
    assert exc.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["reward"]["terms"]["clip"]["weight"] == 0.5
    assert cfg["policy"]["class_path"] == "vlrm_plugins.blip2_opt.tiny_blip2_opt"


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
EVAL_CONFIGS = [p for p in CONFIGS if "policies" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("config", [p for p in CONFIGS if p not in EVAL_CONFIGS], ids=lambda p: p.name)
def test_every_shipped_training_config_parses(config):
    cfg = build_parser().parse_args(["--config", str(config)])
    assert cfg.policy.class_path and cfg.reward.terms and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_eval_config_parses(config):
    from vlrm.eval_cli import build_parser as eval_parser

    cfg = eval_parser().parse_args(["--config", str(config)])
    assert cfg.policies and cfg.evaluators and cfg.generation.num_beams == 1
    assert cfg.generation.max_new_tokens in (12, 60)


def test_retrieval_spec_instantiates_with_tiny_models(tmp_path):
    parser = build_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs" / "retrieval_spec.yaml"),
                             *TINY_OVERRIDES, f"--data.root={ROOT / 'tests'}", "--data.hint=x",
                             "--data.patterns=[\"**/*.py\"]", "--data.extensions=[\".py\"]"])
    init = parser.instantiate(cfg)
    # the paper's values survive the override of the model size
    assert init.policy.max_new_tokens == 60 and init.objective.gamma == 1.0
    assert init.objective.whiten_advantages and init.trainer.samples_per_image == 4
    assert set(init.reward.terms) == {"clip", "ref", "bad", "repeat"}


def test_tiny_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["--config", TINY, *FAST, "--trainer.save_every", "1",
                "--trainer.keep_last", "1", f"--output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert REQUIRED_KEYS <= set(rows[0])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["trainer"]["max_steps"] == 2 and resolved["output_dir"] == str(out)
    ckpts = out / "checkpoints"
    assert os.readlink(ckpts / "last") == "step-2"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last", "step-2"]  # keep_last 1
    assert {"policy", "value_head.safetensors", "trainer_state.pt", "trainer_state.json"} <= {
        p.name for p in (ckpts / "last").iterdir()}


def test_config_with_a_third_party_reward_added_from_the_command_line(tmp_path):
    term = json.dumps({"reward": {"class_path": "vlrm_example_reward.CaptionLengthReward",
                                  "init_args": {"target_words": 4}}, "weight": 0.5})
    out = tmp_path / "run"
    assert run(["--config", TINY, f"--reward.terms.length={term}", *FAST,
                f"--output_dir={out}"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/length", "reward/length/words", "reward/clip"} <= set(row)
    # total = clip + 0.5 * length, per caption, averaged
    assert row["reward/total"] == pytest.approx(row["reward/clip"] + 0.5 * row["reward/length"],
                                                abs=1e-4)


def test_a_second_config_file_replaces_the_terms_mapping(tmp_path):
    config = tmp_path / "only_length.yaml"
    config.write_text(yaml.safe_dump({"reward": {"terms": {"length": {
        "reward": {"class_path": "vlrm_example_reward.CaptionLengthReward"}}}}}))
    cfg = build_parser().parse_args(["--config", TINY, "--config", str(config)])
    assert set(cfg.reward.terms) == {"length"}


def test_example_plugin_config_runs(tmp_path):
    out = tmp_path / "run"
    assert run(["--config", TINY, "--config",
                str(ROOT / "examples" / "reward_plugin" / "tiny_with_length.yaml"),
                *FAST, f"--output_dir={out}"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/length", "reward/clip"} <= set(row)


def test_empty_reward_terms_exit_2(tmp_path, capsys):
    status, err = run_exit(["--config", TINY, "--reward.terms={}"], capsys)
    assert status == 2 and "reward.terms is empty" in err


@pytest.mark.slow
@pytest.mark.parametrize("name, sim, override, objective", [
    ("vlrm.yaml", "itm", "vlrm_plugins.blip2_itm_reward.tiny_blip2_itm_reward", "A2C"),
    ("retrieval_spec.yaml", "clip", "vlrm_plugins.clip_reward.tiny_clip_reward", "A2C"),
    ("grpo.yaml", "itm", "vlrm_plugins.blip2_itm_reward.tiny_blip2_itm_reward", "GRPO"),
    ("rloo.yaml", "itm", "vlrm_plugins.blip2_itm_reward.tiny_blip2_itm_reward", "RLOO")])
def test_paper_configs_train_with_tiny_models(name, sim, override, objective, tmp_path):
    out = tmp_path / "run"
    assert run(["--config", str(ROOT / "configs" / name),
                '--policy={"class_path": "vlrm_plugins.blip2_opt.tiny_blip2_opt"}',
                f'--reward.terms.{sim}.reward={{"class_path": "{override}"}}',
                f"--reward.terms.{sim}.normalize=true", f"--reward.terms.{sim}.clip=3.0",
                '--reward.terms.kl={"reward": {"class_path": '
                '"vlrm_plugins.reference_kl.ReferenceKLPenalty"}, "weight": 0.05}',
                "--data=vlrm_plugins.bundled_photos.bundled_photos", *FAST,
                f"--output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for term in (sim, "ref", "bad", "repeat", "kl"):
        assert f"reward/{term}" in rows[-1], term
    for key in ("normalized", "running_mean", "running_std", "clipped"):
        assert f"reward/{sim}/{key}" in rows[-1], key
    assert rows[0]["reward/kl"] == pytest.approx(0.0, abs=1e-3)  # the first rollout is pi_ref's
    from vlrm.checkpoint import LAST, load_state
    saved = load_state(out / "checkpoints" / LAST)["reward"][sim]  # normalisation survives a save
    assert saved["count"] == 2 * 2 * 2 and saved["mean"] == pytest.approx(rows[-1][f"reward/{sim}/running_mean"])
    assert {"reward/bad/rate", "reward/repeat/rate"} <= set(rows[-1])
    meta = json.loads((out / "checkpoints" / LAST / "trainer_state.json").read_text())
    assert meta["objective"] == objective
    assert ("loss/value" in rows[-1]) is (objective == "A2C")  # only A2C has a critic


def test_the_third_party_reward_is_unannotated():
    """What the test above trains with is a reward written as the README says, without
    type annotations: vlrm matches it by shape."""
    import inspect

    from vlrm_example_reward import CaptionLengthReward

    signature = inspect.signature(CaptionLengthReward.__call__)
    assert all(p.annotation is inspect.Parameter.empty for p in signature.parameters.values())
    assert signature.return_annotation is inspect.Signature.empty


def test_a_reward_that_does_not_fit_is_refused_with_the_reason(tmp_path, capsys):
    term = json.dumps({"reward": {"class_path": "vlrm.data.ImageFolder",
                                  "init_args": {"root": str(tmp_path)}}})
    status, err = run_exit(["--config", TINY, f"--reward.terms.bad={term}"], capsys)
    assert status == 2
    assert "vlrm.data.ImageFolder" in err and "it is not callable" in err


def test_a_trainer_setting_that_moved_to_the_objective_says_where_it_went(capsys):
    status, err = run_exit(["--config", TINY, "--trainer.value_lr", "1e-3"], capsys)
    assert status == 2
    assert "objective.init_args.value_lr" in err and "vlrm.objective.A2C" in err


def test_the_objective_is_chosen_in_the_config_and_listed_by_vlrm_plugins(tmp_path, capsys):
    from vlrm.cli import plugins

    out = tmp_path / "run"
    assert run(["--config", TINY, "--objective", "vlrm_plugins.estimators.RLOO", *FAST,
                f"--output_dir={out}"]) == 0
    meta = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert meta["objective"] == "RLOO"
    assert not (out / "checkpoints" / "last" / "value_head.safetensors").exists()
    capsys.readouterr()
    assert plugins([]) == 0
    listing = capsys.readouterr().out
    assert "objectives: a2c (vlrm.objective.A2C), rloo (vlrm_plugins.estimators.RLOO), grpo " in listing
    assert "ppo_clip (vlrm_plugins.estimators.PPOClip)" in listing
