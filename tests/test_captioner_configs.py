"""Every config under configs/captioners/ parses as a vlrm-run config (composed with the tiny
one, as README's `--config A --config B` does) and builds with tiny overrides: a random-weight
model of the same transformers class, the config's own prompt, trainable and LoRA patterns."""

from pathlib import Path

import pytest
import torch
import yaml

from vlrm.cli import build_parser
from vlrm.testing import synthetic_images

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
#: config file -> the tiny family of the same transformers class
FAMILY = {"smolvlm": "idefics3", "qwen2_5_vl": "qwen2_vl", "florence2": "florence2",
          "paligemma": "paligemma", "gemma3": "gemma3", "llava": "llava",
          "instructblip": "instructblip", "blip2_flan_t5": "blip2_t5", "git": "git"}
CONFIGS = sorted((ROOT / "configs" / "captioners").glob("*.yaml"))


def test_every_family_config_is_listed():
    assert sorted(p.stem for p in CONFIGS) == sorted(FAMILY)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_family_config_parses_and_builds_tiny(path):
    from vlrm_plugins.hf_captioner import tiny_hf_captioner

    cfg = build_parser().parse_args(["--config", TINY, "--config", str(path)])
    assert cfg.policy.class_path == "vlrm_plugins.hf_captioner.hf_captioner"
    args = yaml.safe_load(path.read_text())["policy"]["init_args"]
    assert "/" in args["model"] and not Path(args["model"]).exists()  # a hub name
    policy = tiny_hf_captioner(FAMILY[path.stem], trainable=args["trainable"],
                               prompt=args["prompt"], max_new_tokens=4, lora_rank=2,
                               lora_targets=args["lora_targets"])
    assert any(".lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    torch.manual_seed(0)
    rollout = policy.sample(synthetic_images(2), ["a", "b"], 2)
    assert rollout.batch_size == 4
    gap = ((policy.evaluate(rollout).logprobs - rollout.logprobs) * rollout.mask).abs().max()
    assert gap < 1e-4
