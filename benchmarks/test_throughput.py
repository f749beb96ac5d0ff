"""The GPU section's command (``benchmarks/throughput.py``), run on every preset selected: on a
CPU it checks the command works (``--quick``: tiny; the full run: small too); on a GPU the
``paper`` row is what RESULTS.md's GPU section reports."""

from __future__ import annotations

from benchmarks.throughput import main

IMAGES = {"tiny": 4}  # else 16 images x 4 captions, as the peer benchmark


def test_throughput_report(preset_name, record, tmp_path):
    out = tmp_path / "throughput.md"
    rows = main(["--preset", preset_name, "--images", str(IMAGES.get(preset_name, 16)),
                 "--steps", "1", "--md", str(out)])
    assert [r["impl"] for r in rows] == ["vlrm_grpo", "vlrm_a2c", "trl_grpo"]
    assert all(r["images_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    assert rows[0]["tflops_per_step"] > 0 and rows[0]["tokens_per_s"] > 0
    assert "| vlrm_grpo |" in out.read_text()
    record(**{f"{r['impl']}_{key}": round(r[key], 3) for r in rows
              for key in ("step_s", "images_per_s", "peak_mib", "mfu") if r.get(key) is not None})
