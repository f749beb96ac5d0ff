"""vlrm-eval end to end, and evaluation inside training."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vlrm.cli import run
from vlrm.eval_cli import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
EVAL_TINY = str(ROOT / "configs" / "eval_tiny.yaml")


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(path):
    tags = Tags()
    tags.feed(Path(path).read_text())
    return tags.tags


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert run(["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps", "2",
                "--trainer.images_per_step", "2", "--trainer.samples_per_image", "2",
                "--trainer.progress", "false", "--policy.init_args.max_new_tokens", "6",
                f"--output_dir={out}"]) == 0
    return out


def test_vlrm_eval_writes_captions_metrics_and_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_main(["--config", EVAL_TINY, f"--policies.tuned.init_args.model={tiny_run}",
                      f"--run={tiny_run}", "--num_images=5", "--generation.max_new_tokens=6",
                      "--gallery_size=4", f"--output_dir={out}"]) == 0
    assert "wrote captions.jsonl, eval.json and report.html" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5 and {r["policy"] for r in rows} == {"baseline", "tuned"}
    assert all(1 <= r["num_tokens"] <= 6 for r in rows)
    record = json.loads((out / "eval.json").read_text())
    assert set(record["policies"]) == {"baseline", "tuned"}
    for metrics in record["policies"].values():
        for key in ("clip_recall/r1", "clip_recall/r5", "clip_recall/mrr", "clip_recall/backbone",
                    "clip_score/clip_s", "caption/length", "caption/tokens", "caption/colour_words"):
            assert key in metrics, key
        assert 0.0 <= metrics["clip_recall/r1"] <= 1.0
        assert metrics["clip_recall/num_images"] == 5
    assert record["generation"] == {"max_new_tokens": 6, "num_beams": 1, "greedy": True}
    # captions.jsonl and eval.json agree
    baseline = [r["caption"] for r in rows if r["policy"] == "baseline"]
    words = sum(len(c.split()) for c in baseline) / 5
    assert record["policies"]["baseline"]["caption/length"] == pytest.approx(words, abs=1e-9) or \
        all(c.isascii() for c in baseline) is False
    tags = parse(out / "report.html")
    assert ("table", {"id": "metrics"}) in [(t, {"id": a.get("id")}) for t, a in tags if t == "table"]
    images = [a for t, a in tags if t == "img"]
    assert len(images) == 4 + 2                     # gallery + reward and loss curves
    assert all(a["src"].startswith("data:image/") for a in images)


def test_greedy_captions_are_the_policys_argmax(tiny_policy_factory, photos):
    import torch

    from vlrm.structs import Rollout

    policy = tiny_policy_factory(seed=0, init_std=0.5)
    images = [image for _, image in photos[:3]]
    captions, lengths = policy.caption(images, max_new_tokens=8)
    again, _ = policy.caption(images, max_new_tokens=8)
    assert captions == again and len(captions) == 3
    for image, n in zip(images, lengths):
        text, _ = policy.caption([image], max_new_tokens=8)
        assert text[0] == captions[images.index(image)]     # batching changes nothing
    # each greedy token is the argmax of the policy's own distribution
    tokens, mask = policy.search(images, max_new_tokens=8)
    assert mask.sum(1).tolist() == lengths
    rollout = Rollout(images=images, image_ids=["a", "b", "c"], group=torch.arange(3), tokens=tokens,
                      mask=mask, logprobs=torch.zeros(tokens.shape), captions=captions)
    with torch.no_grad():
        out = policy.evaluate(rollout)
        logp = policy._log_softmax(policy.model.language_model.get_output_embeddings()(out.hidden))
    assert torch.equal(logp.argmax(-1)[mask], tokens[mask])
    assert policy.decode([tokens[0][mask[0]].tolist()]) == captions[:1]


def test_reference_metrics_on_data_without_references_exit_2(tmp_path, capsys):
    status = eval_main(["--config", EVAL_TINY,
                        '--policies={"base": {"class_path": "vlrm_plugins.blip2_opt.tiny_blip2_opt"}}',
                        '--evaluators={"coco": {"class_path": "vlrm_plugins.coco_metrics.CocoMetrics"}}',
                        "--num_images=2", "--generation.max_new_tokens=3", "--run=null",
                        f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert status == 2 and "CocoMetrics" in err and "reference" in err


def test_bad_eval_config_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        eval_main(["--config", EVAL_TINY, "--generation.max_new_tokenz=3"])
    assert info.value.code == 2
    assert "max_new_tokenz" in capsys.readouterr().err
    status = eval_main(["--config", EVAL_TINY, "--policies.tuned.init_args.model=" + str(tmp_path / "none"),
                        f"--output_dir={tmp_path}"])
    assert status == 2 and "none" in capsys.readouterr().err


def test_evaluation_during_training(tmp_path, tiny_policy_factory):
    out = tmp_path / "run"
    eval_cfg = {"class_path": "vlrm.evaluation.PeriodicEval",
                "init_args": {"every": 2, "num_images": 3, "max_new_tokens": 5,
                              "data": {"class_path": "vlrm_plugins.bundled_photos.bundled_photos"},
                              "evaluators": {
                                  "recall": {"class_path": "vlrm_plugins.clip_eval.tiny_clip_recall"},
                                  "caption": {"class_path": "vlrm_plugins.caption_stats.CaptionStats"}}}}
    assert run(["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps", "3",
                "--trainer.images_per_step", "2", "--trainer.samples_per_image", "2",
                "--trainer.policy_lr", "0.05", "--trainer.progress", "false",
                "--policy.init_args.max_new_tokens", "5", f"--eval={json.dumps(eval_cfg)}",
                f"--output_dir={out}"]) == 0
    files = sorted(p.name for p in (out / "eval").iterdir())
    assert files == ["step-0.json", "step-2.json", "step-3.json"]   # baseline, every 2, the end
    first = json.loads((out / "eval" / "step-0.json").read_text())
    assert first["step"] == 0 and first["num_images"] == 3
    assert {"recall/r1", "caption/length", "recall/backbone"} <= set(first["metrics"])
    # step 0 is the untouched policy: its captions are the fresh policy's greedy captions
    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    fresh = tiny_policy_factory(seed=0)
    images = [folder.load_image(s["image_id"]) for s in first["samples"]]
    expected, _ = fresh.caption(images, max_new_tokens=5)
    assert [s["caption"] for s in first["samples"]] == expected
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eval_rows = [r for r in rows if "eval/recall/r1" in r]
    assert [r["step"] for r in eval_rows] == [0, 2, 3]
    assert all("eval/recall/backbone" not in r for r in eval_rows)   # strings stay in eval/*.json


@pytest.mark.slow
def test_vlrm_eval_on_karpathy_coco_with_reference_metrics(tmp_path):
    from test_coco import ENTRIES, filename, karpathy_json

    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    root = tmp_path / "coco"
    for i, (_, filepath, cocoid, _) in enumerate(ENTRIES):
        path = root / filepath / filename(filepath, cocoid)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.load(folder.paths[i]).resize((64, 48)).save(path, format="JPEG")
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps(karpathy_json()))
    out = tmp_path / "eval"
    data = {"class_path": "vlrm.coco.KarpathyCoco",
            "init_args": {"annotations": str(ann), "image_root": str(root), "split": "test"}}
    evaluators = {"coco": {"class_path": "vlrm_plugins.coco_metrics.CocoMetrics"},
                  "clip_score": {"class_path": "vlrm_plugins.clip_eval.tiny_clip_score"},
                  "caption": {"class_path": "vlrm_plugins.caption_stats.CaptionStats"}}
    assert eval_main(["--config", EVAL_TINY, f"--data={json.dumps(data)}",
                      '--policies={"baseline": {"class_path": "vlrm_plugins.blip2_opt.tiny_blip2_opt", '
                      '"init_args": {"init_std": 0.5}}}',
                      f"--evaluators={json.dumps(evaluators)}", "--run=null",
                      "--generation.max_new_tokens=8", f"--output_dir={out}"]) == 0
    record = json.loads((out / "eval.json").read_text())
    metrics = record["policies"]["baseline"]
    n_test = sum(1 for e in ENTRIES if e[0] == "test")
    assert record["num_images"] == {"baseline": n_test}
    assert record["data"]["split"] == "test"
    for key in ("coco/bleu4", "coco/meteor", "coco/rouge_l", "coco/cider", "clip_score/clip_s",
                "clip_score/ref_clip_s", "caption/length"):
        assert key in metrics, key
    # random-weight captions share almost nothing with COCO references
    assert 0.0 <= metrics["coco/bleu4"] < 0.1 and metrics["coco/cider"] < 0.5
    html = (out / "report.html").read_text()
    first_ref = next(e for e in ENTRIES if e[0] == "test")[3][0].strip()
    assert first_ref in html                          # references are shown under the images
