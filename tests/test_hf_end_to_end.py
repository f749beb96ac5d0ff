"""The generic policy through every command: vlrm-run trains a LLaVA-family captioner,
vlrm-eval captions with its checkpoint, vlrm-export writes its delta and a merged folder that
plain transformers loads."""

import json
from pathlib import Path

import pytest
import torch

from vlrm.cli import run
from vlrm.eval_cli import main as eval_main
from vlrm.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]
POLICY = json.dumps({"class_path": "vlrm_plugins.hf_captioner.tiny_hf_captioner",
                     "init_args": {"family": "llava", "max_new_tokens": 5}})


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_run")
    assert run(["--config", str(ROOT / "configs" / "tiny.yaml"), f"--policy={POLICY}",
                "--trainer.max_steps", "2", "--trainer.images_per_step", "2",
                "--trainer.samples_per_image", "2", "--trainer.progress", "false",
                "--trainer.policy_lr", "0.05", f"--output_dir={out}"]) == 0
    return out


def test_vlrm_eval_captions_with_a_trained_hf_captioner(llava_run, tmp_path):
    out = tmp_path / "eval"
    tuned = json.dumps({"class_path": "vlrm_plugins.hf_captioner.hf_captioner",
                        "init_args": {"model": str(llava_run)}})  # prompt and parts from the folder
    assert eval_main(["--config", str(ROOT / "configs" / "eval_tiny.yaml"), f"--policies.baseline={POLICY}",
                      f"--policies.tuned={tuned}", "--num_images=3", "--generation.max_new_tokens=4",
                      "--gallery_size=2", f"--run={llava_run}", f"--output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert {r["policy"] for r in rows} == {"baseline", "tuned"} and len(rows) == 6
    assert all(1 <= r["num_tokens"] <= 4 for r in rows)


def test_vlrm_export_writes_the_trained_parts_and_a_native_folder(llava_run, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    delta, merged = tmp_path / "delta.pt", tmp_path / "merged"
    assert export_main([str(llava_run), "--delta", str(delta), "--merged", str(merged),
                        "--dtype", "float32"]) == 0
    state = torch.load(delta, weights_only=True)
    assert state and all(k.startswith("model.multi_modal_projector.") for k in state)
    model = AutoModelForImageTextToText.from_pretrained(str(merged))
    trained = dict(model.named_parameters())
    assert all(torch.equal(trained[k], v) for k, v in state.items())
    # the delta is what training changed: the untrained captioner differs there
    from vlrm_plugins.hf_captioner import tiny_hf_captioner

    start = dict(tiny_hf_captioner("llava").model.named_parameters())
    assert any(not torch.equal(start[k], v) for k, v in state.items())


def test_export_without_a_policy_record_names_the_flag(tmp_path, capsys):
    from vlrm_plugins.hf_tiny import save_tiny_captioner

    save_tiny_captioner("llava", tmp_path)  # a bare transformers folder: no vlrm_policy.json
    assert export_main([str(tmp_path), "--delta", str(tmp_path / "d.pt")]) == 2
    assert "--policy" in capsys.readouterr().err
