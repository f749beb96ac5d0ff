"""The authors' delta format: export, load onto the base with plain transformers, refuse pickles."""

from pathlib import Path

import pytest
import torch

from vlrm.cli import run
from vlrm.errors import ConfigError
from vlrm.export import export, main as export_main
from vlrm_plugins.blip2_opt import PAPER_TRAINABLE, blip2_opt, load_delta


class Payload:
    """Pickling this needs code: a file holding it must never be unpickled."""

    def __reduce__(self):
        return (print, ("this ran from a checkpoint file",))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_policy_factory):
    """Stands in for Salesforce/blip2-opt-2.7b: a transformers directory of the base model."""
    path = tmp_path_factory.mktemp("base")
    tiny_policy_factory(seed=0).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tuned_run(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run(["--config", "configs/tiny.yaml",
                f'--policy={{"class_path": "vlrm_plugins.blip2_opt.blip2_opt", '
                f'"init_args": {{"model": "{base_dir}", "max_new_tokens": 6}}}}',
                "--trainer.max_steps", "2", "--trainer.images_per_step", "2",
                "--trainer.samples_per_image", "2", "--trainer.policy_lr", "0.01",
                "--trainer.progress", "false", f"--output_dir={out}"]) == 0
    return out


def greedy(model, processor, images, suppress):
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8, suppress_tokens=suppress,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_delta_round_trip_with_plain_transformers(base_dir, tuned_run, tmp_path, photos, dtype):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    delta_path = tmp_path / "vlrm-delta.pt"
    assert export_main([str(tuned_run), "--delta", str(delta_path), "--dtype", dtype]) == 0
    delta = torch.load(delta_path, weights_only=True)
    assert {k.split(".")[0] for k in delta} == set(PAPER_TRAINABLE)
    assert all(v.dtype == getattr(torch, dtype) for v in delta.values())

    tuned = Blip2ForConditionalGeneration.from_pretrained(
        str(tuned_run / "checkpoints" / "last" / "policy")).eval()
    base = Blip2ForConditionalGeneration.from_pretrained(str(base_dir)).eval()
    before = base.state_dict()
    moved = [k for k in delta if not torch.equal(before[k], tuned.state_dict()[k])]
    assert len(moved) > len(delta) // 2          # training changed the parts the delta holds
    result = base.load_state_dict(delta, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {k for k in before if k.split(".")[0] not in PAPER_TRAINABLE}

    processor = Blip2Processor.from_pretrained(str(base_dir))
    images = [image for _, image in photos[:4]]
    suppress = [processor.tokenizer.pad_token_id]
    want_tokens, want_logits = greedy(tuned, processor, images, suppress)
    got_tokens, got_logits = greedy(base, processor, images, suppress)
    assert torch.equal(got_tokens, want_tokens)
    if dtype == "float32":
        assert torch.equal(got_logits, want_logits)
    else:
        assert torch.allclose(got_logits, want_logits, atol=0.05)


def test_training_starts_from_a_delta(base_dir, tuned_run, tmp_path):
    delta_path = tmp_path / "delta.pt"
    export(tuned_run, delta=delta_path, dtype="float32")
    tuned = blip2_opt(str(tuned_run / "checkpoints" / "last" / "policy")).model.state_dict()
    policy = blip2_opt(str(base_dir), delta=str(delta_path))
    state = policy.model.state_dict()
    for key in torch.load(delta_path, weights_only=True):
        assert torch.equal(state[key], tuned[key]), key
    # the same through vlrm-run's config
    out = tmp_path / "run"
    assert run(["--config", "configs/tiny.yaml",
                f'--policy={{"class_path": "vlrm_plugins.blip2_opt.blip2_opt", '
                f'"init_args": {{"model": "{base_dir}", "delta": "{delta_path}", "max_new_tokens": 4}}}}',
                "--trainer.max_steps", "1", "--trainer.images_per_step", "1",
                "--trainer.samples_per_image", "1", "--trainer.progress", "false",
                f"--output_dir={out}"]) == 0


def test_a_pickle_that_runs_code_is_refused(base_dir, tmp_path, capfd):
    evil = tmp_path / "evil.pt"
    torch.save({"query_tokens": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(ConfigError, match=r"evil\.pt.*refused.*weights_only=True"):
        blip2_opt(str(base_dir), delta=str(evil))
    assert "this ran" not in capfd.readouterr().out
    # and through vlrm-run: exit status 2, one message, no traceback, nothing run
    status = run(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"),
                  f'--policy={{"class_path": "vlrm_plugins.blip2_opt.blip2_opt", '
                  f'"init_args": {{"model": "{base_dir}", "delta": "{evil}"}}}}',
                  f"--output_dir={tmp_path / 'run'}"])
    out, err = capfd.readouterr()
    assert status == 2, err
    assert "refused" in err and "Traceback" not in err
    assert "this ran" not in out + err


def test_deltas_for_another_model_fail_loudly(base_dir, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(str(base_dir))
    wrong_key, wrong_shape, not_a_dict = tmp_path / "k.pt", tmp_path / "s.pt", tmp_path / "l.pt"
    torch.save({"qformer.nope.weight": torch.zeros(2)}, wrong_key)
    torch.save({"query_tokens": torch.zeros(1, 3, 5)}, wrong_shape)
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ConfigError, match="not in the model.*qformer.nope.weight"):
        load_delta(model, str(wrong_key))
    with pytest.raises(ConfigError, match="shapes differ.*query_tokens"):
        load_delta(model, str(wrong_shape))
    with pytest.raises(ConfigError, match="dict of tensor"):
        load_delta(model, str(not_a_dict))
    with pytest.raises(ConfigError, match="no such file"):
        load_delta(model, str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a readable torch file"):
        load_delta(model, str(tmp_path / "junk.pt"))


def test_merged_directory_folds_lora_in(tiny_policy_factory, tmp_path, photos, capsys):
    from transformers import Blip2ForConditionalGeneration

    policy = tiny_policy_factory(seed=0, max_new_tokens=8, lora_rank=4)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.2)
    checkpoint = tmp_path / "policy"
    policy.save_pretrained(str(checkpoint))
    assert export_main([str(checkpoint), "--merged", str(tmp_path / "merged"),
                        "--delta", str(tmp_path / "d.pt")]) == 0
    assert "LoRA adapters, which a delta cannot carry" in capsys.readouterr().err
    merged = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    assert not (tmp_path / "merged" / "lora.json").exists()
    torch.manual_seed(0)
    ids, images = zip(*photos[:2])
    rollout = policy.sample(images, ids, 2)
    policy.model.language_model = merged.language_model  # score with the merged OPT, no LoRA
    policy.lora, policy.model.qformer = None, merged.qformer
    with torch.no_grad():
        got = policy.evaluate(rollout).logprobs * rollout.mask
    assert torch.allclose(got, rollout.logprobs, atol=1e-4)


def test_export_errors_exit_2(tmp_path, capsys):
    assert export_main([str(tmp_path), "--delta", str(tmp_path / "d.pt")]) == 2
    assert "holds no policy" in capsys.readouterr().err
    assert export_main([str(tmp_path)]) == 2
    assert "nothing to write" in capsys.readouterr().err
