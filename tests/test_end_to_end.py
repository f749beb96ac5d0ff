"""The README's main job, exactly as a user runs it: the console script on configs/tiny.yaml."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_vlrm_run_tiny_config_trains_and_saves_a_loadable_policy(tmp_path):
    exe = shutil.which("vlrm-run") or str(Path(os.sys.executable).parent / "vlrm-run")
    out = tmp_path / "tiny"
    proc = subprocess.run([exe, "--config", str(ROOT / "configs" / "tiny.yaml"),
                           f"--output_dir={out}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vlrm:" in proc.stderr  # the progress bar
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 20
    keys = {"step", "loss/policy", "loss/value", "reward/total", "reward/clip",
            "caption/length", "time/step_s", "data/skipped"}
    for row in rows:
        assert keys <= set(row)
        assert all(v == v and abs(v) != float("inf") for v in row.values())  # finite

    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from vlrm_plugins.bundled_photos import bundled_photos

    policy_dir = out / "checkpoints" / "last" / "policy"
    model = Blip2ForConditionalGeneration.from_pretrained(policy_dir).eval()
    processor = Blip2Processor.from_pretrained(policy_dir)
    folder = bundled_photos()
    inputs = processor(images=[folder.load(folder.paths[0])], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    caption = processor.batch_decode(tokens[:, model.config.num_query_tokens + 1:],
                                     skip_special_tokens=True)[0]
    assert tokens.shape[1] > model.config.num_query_tokens + 1 and isinstance(caption, str)
    # the saved Q-Former is the trained one, not the initial random one
    first = Blip2ForConditionalGeneration.from_pretrained(out / "checkpoints" / "step-10" / "policy")
    assert not torch.equal(first.query_tokens, model.query_tokens)
