"""A reduced shapes-world build and a short demo run, as CI runs them."""

import json
from pathlib import Path

import pytest

from vlrm_shapes.world import parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from vlrm_shapes.build import build_world

    out = tmp_path_factory.mktemp("world")
    record = build_world(str(out), train_images=256, reward_clip_steps=20, judge_clip_steps=20,
                         vision_steps=20, captioner_steps=40, itm_steps=5, llava_vision_steps=5,
                         llava_steps=10, vlm_judge_steps=5, progress=False)
    assert record["captioner"]["steps"] == 40 and record["itm"]["steps"] == 5
    assert record["llava_captioner"]["steps"] == 10
    assert json.loads((out / "build.json").read_text())["vlm_judge"]["steps"] == 5
    return out


def test_build_writes_a_llava_captioner_that_transformers_and_the_policy_load(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    from vlrm.testing import check_policy
    from vlrm_plugins.hf_inputs import native_captions
    from vlrm_shapes.llava import shapes_llava_captioner
    from vlrm_shapes.world import ShapesWorld

    folder = built / "llava_captioner"
    assert isinstance(AutoModelForImageTextToText.from_pretrained(str(folder)), LlavaForConditionalGeneration)
    AutoProcessor.from_pretrained(str(folder))
    policy = shapes_llava_captioner(str(built), max_new_tokens=6)
    assert {n for n, p in policy.model.named_parameters() if p.requires_grad} == {
        f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    images = [ShapesWorld(0).image("test", i) for i in range(3)]
    check_policy(policy, images, native_captions=native_captions, max_new_tokens=6)


def test_build_writes_models_the_real_loaders_read(built):
    from transformers import Blip2ForConditionalGeneration

    from vlrm_shapes.world import shapes_captioner, shapes_clip_recall, shapes_reward_clip

    assert json.loads((built / "build.json").read_text())["train_images"] == 256
    Blip2ForConditionalGeneration.from_pretrained(str(built / "captioner"))
    policy = shapes_captioner(str(built))
    assert {n.split(".")[0] for n, p in policy.model.named_parameters() if p.requires_grad} == {
        "qformer", "query_tokens", "language_projection"}
    reward = shapes_reward_clip(str(built))
    assert reward.context_length == 32
    judge = shapes_clip_recall(str(built), "judge")
    assert judge.clip.model is not reward.model
    # the judge shares no weights with the reward CLIP (other seed and width)
    assert judge.clip.model.visual.conv1.weight.shape != reward.model.visual.conv1.weight.shape


def test_full_grammar_constraint_forces_complete_captions(built):
    from vlrm_shapes.demo import full_grammar
    from vlrm_shapes.world import ShapesImages, shapes_captioner

    policy = shapes_captioner(str(built))
    data = ShapesImages("test", num_images=8)
    images = [data.load_image(i) for i in data.ids()]
    captions, _ = policy.caption(images, max_new_tokens=20, allowed_tokens=full_grammar(policy.tokenizer))
    for caption in captions:
        parsed = parse(caption)
        assert parsed.grammatical, caption
        assert all(o.colour and o.size for o in parsed.objects), caption


@pytest.mark.parametrize("config", ["vlrm_rs.yaml", "llava_rs.yaml"])
def test_short_demo_writes_summary_and_report(built, tmp_path, capsys, config):
    """Both captioner families (BLIP-2 OPT and the LLaVA-style one through hf_captioner)."""
    from vlrm_shapes.demo import SUMMARY_KEYS, main

    out = tmp_path / "demo"
    w = str(built)
    assert main(["demo", "--config", str(ROOT / "configs" / "shapes" / config),
                 f"--policy.init_args.weights={w}", f"--reward.terms.clip.reward.init_args.weights={w}",
                 f"--demo.weights={w}", "--demo.test_images=40", "--trainer.max_steps=2",
                 "--trainer.images_per_step=4", "--trainer.samples_per_image=2",
                 "--trainer.progress=false", "--seed=3", f"--output_dir={out}"]) == 0
    table = capsys.readouterr().out
    assert "clip_recall/r1" in table and "baseline" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"baseline", "ceiling", "final", "oracle"}
    for name, metrics in summary.items():
        for key in SUMMARY_KEYS:
            assert key in metrics, (name, key)
    assert summary["oracle"]["caption/grammar_rate"] == 1.0
    assert summary["oracle"]["caption/attribute_accuracy"] == 1.0
    assert summary["oracle"]["caption/repetition_rate"] < 0.05 and summary["oracle"]["caption/bad_phrase_rate"] == 0
    assert summary["ceiling"]["caption/grammar_rate"] == 1.0
    assert summary["oracle"]["clip_recall/num_images"] == 40
    assert (out / "report.html").is_file() and (out / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"reference", "baseline", "final", "ceiling"} <= set(rows[0])
    config = (out / "config.yaml").read_text()
    assert "\nseed: 3\n" in config


def test_the_shipped_world_loads_through_the_default_paths():
    from vlrm_shapes.world import (WEIGHTS, ShapesImages, shapes_captioner, shapes_clip_recall,
                                           shapes_reward_clip)

    record = json.loads((WEIGHTS / "build.json").read_text())
    assert record["seed"] == 0 and record["judge_clip"]["seed"] != record["reward_clip"]["seed"]
    policy = shapes_captioner()
    data = ShapesImages("test", num_images=4)
    captions, _ = policy.caption([data.load_image(i) for i in data.ids()], max_new_tokens=20)
    assert all(parse(c).grammatical for c in captions)   # the trained captioner speaks the grammar
    assert shapes_reward_clip().context_length == 32
    assert shapes_clip_recall().protocol["backbone"] == "shapes-judge-clip"


def test_build_in_one_process_trains_the_same_clips(built, tmp_path):
    """workers=1 runs the stages in turn, sharing one rendering of the images; the CLIPs it
    trains are the ones the two-process build trains (same seeds, same steps)."""
    import torch
    from safetensors.torch import load_file

    from vlrm_shapes.build import build_world

    record = build_world(str(tmp_path), train_images=256, reward_clip_steps=20, judge_clip_steps=20,
                         vision_steps=20, captioner_steps=40, itm_steps=0, llava_steps=0, workers=1,
                         progress=False)
    assert record["workers"] == 1 and "itm" not in record
    for clip in ("reward_clip", "judge_clip"):
        ours = {k: v for f in (tmp_path / clip).glob("*.safetensors") for k, v in load_file(f).items()}
        theirs = {k: v for f in (built / clip).glob("*.safetensors") for k, v in load_file(f).items()}
        assert ours.keys() == theirs.keys() and ours
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-4) for k in ours)


def test_caption_kind_is_the_style_of_the_biased_caption():
    from vlrm_shapes.world import ShapesWorld

    world = ShapesWorld(0)
    for i in range(200):
        caption, kind = world.biased_caption("train", i), world.caption_kind("train", i)
        parsed = parse(caption)
        assert parsed.meta == (kind == 1) and parsed.year == (kind == 2), (caption, kind)
        assert all(o.colour for o in parsed.objects) == (kind == 3), (caption, kind)


def test_continue_captioner_trains_in_place_and_records_the_round(built, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from vlrm_shapes.build import continue_captioner

    world = tmp_path / "world"
    shutil.copytree(built, world)
    before = load_file(str(world / "captioner" / "model.safetensors"))
    record = continue_captioner(str(world), steps=3, train_images=64, progress=False)
    after = load_file(str(world / "captioner" / "model.safetensors"))
    assert record["captioner_rounds"][-1]["steps"] == 3
    assert json.loads((world / "build.json").read_text())["captioner_rounds"] == record["captioner_rounds"]
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert "vision_model" not in changed and {"qformer", "language_model"} <= changed


def test_sweep_runs_each_seed_and_ablation_and_tabulates_them(built, tmp_path, capsys):
    from vlrm_shapes.demo import main

    out = tmp_path / "sweep"
    w = str(built)
    assert main(["sweep", "--seeds", "0", "1", "--ablations", "no_ref", "opt_unfrozen",
                 f"--output_dir={out}",
                 "--config", str(ROOT / "configs" / "shapes" / "vlrm_rs.yaml"),
                 f"--policy.init_args.weights={w}", f"--reward.terms.clip.reward.init_args.weights={w}",
                 f"--demo.weights={w}", "--demo.test_images=20", "--trainer.max_steps=2",
                 "--trainer.images_per_step=2", "--trainer.samples_per_image=2",
                 "--trainer.progress=false"]) == 0
    results = json.loads((out / "sweep.json").read_text())
    assert list(results) == ["seed0", "seed1", "no_ref", "opt_unfrozen"]
    table = (out / "sweep.md").read_text()
    assert "| seeds: mean ± sd |" in table and "| opt_unfrozen |" in table
    assert "\nseed: 1\n" in (out / "seed1" / "config.yaml").read_text()
    assert "weight: 0.0" in (out / "no_ref" / "config.yaml").read_text()
    # OPT trained in the unfrozen run only: its saved LM differs from the captioner's
    import torch
    from safetensors.torch import load_file

    base = load_file(str(built / "captioner" / "model.safetensors"))

    def lm_changed(run):
        saved = load_file(str(next((out / run / "checkpoints").glob("*/policy/model.safetensors"))))
        return any(not torch.equal(saved[k], base[k]) for k in base if k.startswith("language_model"))

    assert lm_changed("opt_unfrozen") and not lm_changed("seed0")


def test_sweep_rejects_an_unknown_ablation(capsys):
    from vlrm_shapes.demo import main

    assert main(["sweep", "--ablations", "no_such", "--config", "x.yaml"]) != 0
    assert "no_such" in capsys.readouterr().err


def test_sweep_over_objectives_runs_each_estimator_and_seed_and_writes_the_doc(built, tmp_path):
    from vlrm_shapes.demo import main

    out, doc = tmp_path / "sweep", tmp_path / "estimators.md"
    doc.write_text("# Estimators\n\nProse before.\n\n<!-- sweep:begin -->\nold\n<!-- sweep:end -->\n\nProse after.\n")
    w = str(built)
    args = ["sweep", "--objectives", "a2c", "grpo", "--seeds", "1", "--jobs", "2",
            f"--output_dir={out}", f"--doc={doc}",
            "--config", str(ROOT / "configs" / "shapes" / "vlrm_rs.yaml"),
            f"--policy.init_args.weights={w}", f"--reward.terms.clip.reward.init_args.weights={w}",
            f"--demo.weights={w}", "--demo.test_images=20", "--trainer.max_steps=2",
            "--trainer.images_per_step=2", "--trainer.samples_per_image=2"]
    assert main(args) == 0
    results = json.loads((out / "sweep.json").read_text())
    assert list(results) == ["a2c", "grpo"] and list(results["grpo"]) == ["seed1"]
    assert "vlrm_plugins.estimators.GRPO" in (out / "grpo" / "seed1" / "config.yaml").read_text()
    assert "\nseed: 1\n" in (out / "grpo" / "seed1" / "config.yaml").read_text()
    for name, critic in (("a2c", True), ("grpo", False)):  # the estimator that trained
        row = json.loads((out / name / "seed1" / "metrics.jsonl").read_text().splitlines()[-1])
        assert ("loss/value" in row) is critic, name
    record = results["a2c"]["seed1"]
    assert record["steps"] == 2 and record["peak_mib"] > 100 and record["s_per_step"] > 0
    text = doc.read_text()
    assert "Prose before." in text and "Prose after." in text and "\nold\n" not in text
    assert "| grpo | 1 |" in text and "| (ceiling) |" in text
    # A finished run is not run again: a second seed runs, the first is read back.
    stamp = (out / "a2c" / "seed1" / "summary.json").stat().st_mtime
    assert main(["sweep", "--objectives", "a2c", "--seeds", "1", "2", *args[6:]]) == 0
    assert (out / "a2c" / "seed1" / "summary.json").stat().st_mtime == stamp
    assert "| a2c | 1, 2 |" in doc.read_text() and "(worst " in doc.read_text()


def test_judging_during_training_leaves_the_training_unchanged(built, tmp_path):
    from vlrm_shapes.demo import main

    w = str(built)

    def run(every):
        out = tmp_path / f"every{every}"
        assert main(["demo", "--config", str(ROOT / "configs" / "shapes" / "demo.yaml"),
                     f"--policy.init_args.weights={w}", f"--reward.terms.clip.reward.init_args.weights={w}",
                     f"--demo.weights={w}", "--demo.test_images=20", "--trainer.max_steps=3",
                     "--trainer.images_per_step=2", "--trainer.samples_per_image=2",
                     "--trainer.progress=false", f"--demo.judge_every={every}",
                     f"--output_dir={out}"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row.pop("time/step_s", None)
        return rows, json.loads((out / "summary.json").read_text())

    plain, plain_summary = run(0)
    judged, judged_summary = run(2)
    judgements = [r for r in judged if "eval/clip_recall/r1" in r]
    assert [r["step"] for r in judgements] == [0, 2, 3]  # before RL, every 2 steps, the end
    assert [r for r in judged if "eval/clip_recall/r1" not in r] == plain
    assert judged_summary == plain_summary
    assert judgements[-1]["eval/clip_recall/r1"] == judged_summary["final"]["clip_recall/r1"]
    assert main(["demo", "--config", str(ROOT / "configs" / "shapes" / "demo.yaml"),
                 "--demo.judge_every=-1"]) == 2


def test_estimator_table_judges_each_estimator_at_the_fastest_ones_wall_clock():
    from vlrm_shapes.sweep import estimator_table

    keys = ("clip_recall/r1", "reward_clip/r1", "caption/grammar_rate",
            "caption/repetition_rate", "caption/invented_objects")
    summary = {ref: dict.fromkeys(keys, 0.5) for ref in ("baseline", "final", "ceiling", "oracle")}
    summary["baseline"]["clip_recall/r1"] = 0.0

    def record(s_per_step, judged):
        return {"summary": summary, "steps": 10, "s_per_step": s_per_step, "peak_mib": 900.0,
                "reward_curve": [(s, 0.1 * s) for s in range(1, 11)], "judge_curve": judged}

    table = estimator_table({
        "fast": {"seed1": record(1.0, [(0, 0.1), (5, 0.2), (10, 0.3)])},
        "slow": {"seed1": record(2.0, [(0, 0.1), (4, 0.4), (6, 0.6), (10, 0.7)])},
        "unjudged": {"seed1": record(1.0, [])}})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()}
    assert "judge R@1 at 10 s (step)" in table  # the fastest needs 10 s for its 10 steps
    assert rows["fast"][-1].strip(" |") == "0.300 (10)"
    assert rows["slow"][-1].strip(" |") == "0.400 (4)"  # 5 steps in 10 s: judged last at 4
    assert rows["slow"][-2] == "0.300"  # training reward: mean of its steps 1..5
    assert rows["unjudged"][-1].strip(" |") == "-"


def test_late_table_averages_the_last_five_judgements_per_seed():
    from vlrm_shapes.sweep import late_table

    def record(final_r1, invented):  # judgements 0.1, 0.2, ... of R@1; baseline 0, ceiling 0.5
        summary = {"baseline": {"clip_recall/r1": 0.0}, "ceiling": {"clip_recall/r1": 0.5},
                   "final": {"clip_recall/r1": final_r1, "caption/invented_objects": invented[-1]}}
        late = [{"clip_recall/r1": 0.1 * (k + 1), "caption/invented_objects": inv,
                 "caption/repetition_rate": 0.02} for k, inv in enumerate(invented)]
        return {"summary": summary, "late": late}

    table = late_table({"a": {"seed1": record(0.5, [0.0, 0.1, 0.0, 0.1, 0.05]),
                              "seed2": record(0.25, [0.02] * 5)}})
    row = table.splitlines()[2].split(" | ")
    assert row[1] == "1.00 / 0.50"  # final share of the gap per seed
    # last five: shares 0.2..1.0 (mean 0.6) on both seeds; invented 0.05 and 0.02
    assert row[2].startswith("0.60 ± 0.00")
    assert row[3] == "0.050 / 0.020" and row[4].startswith("0.035 ± ") and "(worst 0.050)" in row[4]
    short = {"a": {"seed1": {**record(0.5, [0.0] * 5), "late": [{}] * 4}}}
    assert late_table(short) == ""  # fewer than five judgements: no table


def test_sweep_names_the_unknown_objective(capsys):
    from vlrm_shapes.demo import main

    assert main(["sweep", "--objectives", "no_such", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no_such" in err and "grpo" in err


def test_build_writes_a_vlm_judge_that_scores_as_it_was_trained(built):
    import torch

    from vlrm.testing import check_reward, make_rollout
    from vlrm_shapes.build import pixels
    from vlrm_shapes.judge_vlm import shapes_vlm_judge, yes_no_logits
    from vlrm_shapes.llava import patch_features
    from vlrm_shapes.world import ShapesWorld, describe

    world = ShapesWorld(0)
    images = [world.image("test", i) for i in range(3)]
    captions = [[world.full_caption("test", 0), "a small red circle"],
                [describe(world.scene("test", 1), False, False)],
                [world.partial_caption("test", 2), "a circle and a circle"]]
    judge = shapes_vlm_judge(str(built))
    rollout = make_rollout(captions, images=images)
    out = check_reward(judge, rollout)
    assert ((out.sequence > 0) & (out.sequence < 1)).all()
    with torch.no_grad():
        served = judge.answer_logits(images, rollout.group, rollout.captions)[:, judge.yes + judge.no]
        features = patch_features(judge.model.model.vision_tower, pixels(images))
        trained = yes_no_logits(judge.model, judge.tokenizer, features[rollout.group], rollout.captions)
    torch.testing.assert_close(served.float(), trained, atol=1e-4, rtol=1e-4)


def test_sweep_over_rewards_runs_each_reward_and_writes_the_doc(built, tmp_path):
    from vlrm_shapes.demo import main

    out, doc = tmp_path / "sweep", tmp_path / "rewards.md"
    w = str(built)
    judge = tmp_path / "vlm_judge.yaml"  # the shipped fragment, on the test's world
    judge.write_text((ROOT / "configs" / "shapes" / "rewards" / "vlm_judge.yaml").read_text()
                     .replace("shapes_vlm_judge ", f"shapes_vlm_judge\n        init_args: {{weights: {w}}} "))
    assert main(["sweep", "--rewards", "clip", str(judge), "qa", "--seeds", "1", "--jobs", "2",
                 f"--output_dir={out}", f"--doc={doc}",
                 "--config", str(ROOT / "configs" / "shapes" / "demo.yaml"),
                 f"--policy.init_args.weights={w}", f"--reward.terms.clip.reward.init_args.weights={w}",
                 f"--demo.weights={w}", "--demo.test_images=20", "--trainer.max_steps=2",
                 "--trainer.images_per_step=2", "--trainer.samples_per_image=2"]) == 0
    rows = {name: json.loads((out / name / "seed1" / "metrics.jsonl").read_text().splitlines()[-1])
            for name in ("clip", "vlm_judge", "qa")}
    assert "reward/judge" in rows["vlm_judge"] and "reward/qa" in rows["qa"]
    assert "reward/judge" not in rows["clip"] and "reward/clip" in rows["qa"]  # logged, weight 0
    text = doc.read_text()
    assert text.startswith("# Rewards side by side") and "--rewards clip " in text
    assert "| vlm_judge | 1 |" in text and "attribute accuracy" in text and "| (ceiling) |" in text
