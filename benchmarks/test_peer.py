"""vlrm against its peer, TRL: the GRPO step on the same model, images, rewards and settings
(``benchmarks.trl_peer``), alternating in one process."""

from __future__ import annotations

import tempfile

from benchmarks.conftest import ratio_row, rounds_of
from benchmarks.presets import with_images
from benchmarks.steps import vlrm_grpo_step
from benchmarks.trl_peer import WORKAROUNDS, TrlGrpoPeer, trl_available

IMAGES = {"tiny": 4, "small": 16}  # N images x K = 4 captions a step
TARGETS = {"small": 2.0}  # vs TRL's GRPO step, CPU (issue 17)


def test_grpo_step_vs_trl(preset, request):
    version = trl_available()
    assert version, "TRL is not installed: pip install -e '.[bench]' (make setup installs it)"
    preset = with_images(preset, IMAGES.get(preset.name))
    n = len(preset.images)
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as trl_dir:
        peer = TrlGrpoPeer(preset, trl_dir)
        ours = vlrm_grpo_step(preset, ours_dir)
        ours()  # warm-up (TRL's first round is its warm-up)
        trl_s, ours_s = peer.run(rounds_of(request.config), between=ours)
    row = ratio_row(request.node.name, ours_s, trl_s, units=n, unit="images",
                    target=TARGETS.get(preset.name), baseline_name=f"TRL {version} GRPOTrainer",
                    extra=lambda _: {"images_x_captions": f"{n}x{preset.samples_per_image}",
                                     "trl_workarounds": len(WORKAROUNDS)})
    assert len(trl_s) == len(ours_s) == rounds_of(request.config) and row["vlrm_s"] > 0
