"""Peak memory of the A2C step per preset, and the frozen tower held once (paper sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.presets import paper_parameter_bytes

ROOT = Path(__file__).resolve().parent.parent


def _peak(preset: str, impl: str, extra: list[str] | None = None) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--preset", preset,
                          "--impl", impl, *(extra or [])], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_peak_memory(record, preset_name):
    """Peak RSS (and CUDA peak on a GPU) of two A2C steps in a fresh process."""
    ours, naive = _peak(preset_name, "vlrm"), _peak(preset_name, "naive")
    figures = {f"{impl}_{key}": value for impl, fig in (("vlrm", ours), ("naive", naive))
               for key, value in fig.items() if key.endswith("_mib")}
    record(**figures)
    assert ours["peak_rss_mib"] > ours["models_rss_mib"] > 0


def test_grpo_step_peak_memory_vs_trl(record, preset_name):
    """Peak RSS of two GRPO steps in a fresh process, vlrm's and TRL's GRPOTrainer's (the
    peer benchmark's setting: ``benchmarks/test_peer.py``)."""
    from benchmarks.test_peer import IMAGES

    images = str(IMAGES.get(preset_name, 0) or "")
    extra = ["--images", images] if images else []
    ours, trl = _peak(preset_name, "vlrm_grpo", extra), _peak(preset_name, "trl_grpo", extra)
    record(**{f"{impl}_{key}": value for impl, fig in (("vlrm_grpo", ours), ("trl_grpo", trl))
              for key, value in fig.items() if key.endswith("_mib")})
    assert trl["peak_rss_mib"] > trl["models_rss_mib"] > 0 and ours["peak_rss_mib"] > 0


def test_paper_frozen_vision_tower_held_once(record):
    """BLIP-2 OPT-2.7B and BLIP-2 ITM share one frozen ViT-g; counted on the meta device."""
    sizes = paper_parameter_bytes()
    gib = {k: round(v / 2**30, 3) for k, v in sizes.items()}
    assert sizes["itm.vision_model"] == sizes["policy.vision_model"]
    separate = sizes["policy"] + sizes["itm"] + sizes["clip"]
    shared = separate - sizes["itm.vision_model"]
    record(**{f"{k}_gib": v for k, v in gib.items()},
           all_models_separate_gib=round(separate / 2**30, 3),
           all_models_shared_gib=round(shared / 2**30, 3),
           saved_gib=gib["itm.vision_model"])
    assert sizes["itm.vision_model"] > 1.5 * 2**30  # ViT-g: about 1.0 B parameters in bf16
