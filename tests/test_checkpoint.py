"""Atomic checkpoints: write_checkpoint, list_checkpoints, save_state, load_state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vlrm.checkpoint import LAST, list_checkpoints, load_state, save_state, step_dir, write_checkpoint
from vlrm.errors import ConfigError


def _writer(tag: str):
    """A ``write`` callback that makes a small tree of files tagged with ``tag``."""

    def write(folder: Path) -> None:
        (folder / "policy").mkdir()
        (folder / "policy" / "config.json").write_text(json.dumps({"tag": tag}))
        (folder / "value_head.safetensors").write_bytes(tag.encode() * 4)

    return write


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _last(checkpoints: Path) -> Path:
    link = checkpoints / LAST
    assert link.is_symlink()
    return link


class Opaque:
    """Not a tensor or plain container: unpickling it would run this module's code."""

    def __init__(self, value: int) -> None:
        self.value = value


# ---------------------------------------------------------------- write_checkpoint


def test_write_checkpoint_creates_step_dir_and_relative_last(tmp_path):
    checkpoints = tmp_path / "out" / "checkpoints"  # parents are created

    final = write_checkpoint(checkpoints, 3, _writer("three"))

    assert final == checkpoints / "step-3" == step_dir(checkpoints, 3)
    assert final.is_dir() and not final.is_symlink()
    assert _tree(final) == {
        "policy/config.json": b'{"tag": "three"}',
        "value_head.safetensors": b"three" * 4,
    }
    link = _last(checkpoints)
    assert os.readlink(link) == "step-3"  # relative: survives moving the output folder
    assert link.resolve() == final.resolve()
    assert list_checkpoints(checkpoints) == [final]
    # nothing temporary is left behind
    assert sorted(p.name for p in checkpoints.iterdir()) == [LAST, "step-3"]


def test_second_checkpoint_moves_last(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = write_checkpoint(checkpoints, 1, _writer("one"))

    second = write_checkpoint(checkpoints, 2, _writer("two"))

    assert os.readlink(_last(checkpoints)) == "step-2"
    assert json.loads((checkpoints / LAST / "policy" / "config.json").read_text()) == {"tag": "two"}
    assert _tree(first)["value_head.safetensors"] == b"one" * 4  # the old one is untouched
    assert list_checkpoints(checkpoints) == [first, second]
    assert sorted(p.name for p in checkpoints.iterdir()) == [LAST, "step-1", "step-2"]


def test_last_survives_moving_the_output_folder(tmp_path):
    checkpoints = tmp_path / "a" / "checkpoints"
    write_checkpoint(checkpoints, 4, _writer("four"))

    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)

    link = moved / "checkpoints" / LAST
    assert (link / "value_head.safetensors").read_bytes() == b"four" * 4


def test_failing_write_leaves_previous_checkpoint_and_last(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    good = write_checkpoint(checkpoints, 10, _writer("good"))
    before = _tree(good)

    class Boom(RuntimeError):
        pass

    def half_write(folder: Path) -> None:
        (folder / "value_head.safetensors").write_bytes(b"partial")
        (folder / "policy").mkdir()
        raise Boom("disk full")

    with pytest.raises(Boom, match="disk full"):
        write_checkpoint(checkpoints, 20, half_write)

    assert os.readlink(_last(checkpoints)) == "step-10"
    assert _tree(checkpoints / LAST) == before
    assert _tree(good) == before
    assert list_checkpoints(checkpoints) == [good]
    assert not (checkpoints / "step-20").exists()


def test_failing_write_of_same_step_keeps_old_copy(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    good = write_checkpoint(checkpoints, 7, _writer("good"))
    before = _tree(good)

    def half_write(folder: Path) -> None:
        (folder / "value_head.safetensors").write_bytes(b"partial")
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        write_checkpoint(checkpoints, 7, half_write)

    assert _tree(good) == before
    assert os.readlink(_last(checkpoints)) == "step-7"
    assert list_checkpoints(checkpoints) == [good]


def test_retry_after_failure_succeeds(tmp_path):
    checkpoints = tmp_path / "checkpoints"

    def fail(folder: Path) -> None:
        (folder / "junk").write_text("x")
        raise ValueError("boom")

    with pytest.raises(ValueError):
        write_checkpoint(checkpoints, 5, fail)
    assert not (checkpoints / LAST).exists() and not (checkpoints / LAST).is_symlink()
    assert list_checkpoints(checkpoints) == []

    final = write_checkpoint(checkpoints, 5, _writer("five"))

    assert _tree(final) == {"policy/config.json": b'{"tag": "five"}',
                            "value_head.safetensors": b"five" * 4}  # no "junk" from the failure
    assert os.readlink(_last(checkpoints)) == "step-5"


def test_keep_last_orders_by_step_number(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (5, 10, 100):
        write_checkpoint(checkpoints, step, _writer(str(step)), keep_last=2)

    # as strings "step-100" < "step-5": a string sort would delete step-100
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-10", "step-100"]
    assert not (checkpoints / "step-5").exists()
    assert os.readlink(_last(checkpoints)) == "step-100"
    assert (checkpoints / LAST / "value_head.safetensors").read_bytes() == b"100" * 4


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    # a previous, longer run into the same output folder left these behind
    for step in (80, 90, 100):
        write_checkpoint(checkpoints, step, _writer(str(step)), keep_last=3)

    final = write_checkpoint(checkpoints, 10, _writer("new"), keep_last=3)

    assert final.is_dir()
    assert (checkpoints / LAST).resolve() == final.resolve()
    assert (checkpoints / LAST / "value_head.safetensors").read_bytes() == b"new" * 4


def test_keep_last_zero_keeps_all(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        write_checkpoint(checkpoints, step, _writer(str(step)))

    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-1", "step-2", "step-3", "step-4"]


def test_list_checkpoints_sorts_numerically_and_ignores_other_entries(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (100, 5, 10, 9):
        write_checkpoint(checkpoints, step, _writer(str(step)))
    (checkpoints / "step-abc").mkdir()
    (checkpoints / "step-11").write_text("a file, not a checkpoint")
    (checkpoints / ".step-12.partial-999").mkdir()

    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-5", "step-9", "step-10", "step-100"]


def test_saving_same_step_twice_replaces_it(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    write_checkpoint(checkpoints, 8, _writer("old"))

    def write_new(folder: Path) -> None:
        (folder / "only_new.bin").write_bytes(b"new")

    final = write_checkpoint(checkpoints, 8, write_new)

    assert _tree(final) == {"only_new.bin": b"new"}  # no stale file from the old copy
    assert list_checkpoints(checkpoints) == [final]
    assert os.readlink(_last(checkpoints)) == "step-8"
    assert sorted(p.name for p in checkpoints.iterdir()) == [LAST, "step-8"]


# ---------------------------------------------------------------- save_state / load_state


def _trainer_state() -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()
    state = {
        "step": 42,
        "weights": {"w": torch.randn(3, 4), "ids": torch.arange(6, dtype=torch.int64)},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "history": [1.5, 2.5],
        "name": "run-1",
    }
    return state, model, optimizer


def test_save_load_state_round_trip(tmp_path):
    state, model, _ = _trainer_state()
    meta = {"step": 42, "reward": 0.75, "config": {"lr": 1e-3}}

    save_state(tmp_path, state, meta)
    loaded = load_state(tmp_path)

    assert loaded["step"] == 42
    assert loaded["history"] == [1.5, 2.5]
    assert loaded["name"] == "run-1"
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert loaded["weights"]["ids"].dtype == torch.int64
    assert torch.equal(loaded["weights"]["ids"], state["weights"]["ids"])
    assert torch.equal(loaded["rng"], state["rng"])
    assert loaded["rng"].dtype == torch.uint8

    opt = loaded["optimizer"]
    assert opt["param_groups"] == state["optimizer"]["param_groups"]
    assert opt["state"].keys() == state["optimizer"]["state"].keys() == {0, 1}
    for key, saved in state["optimizer"]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt["state"][key][name], saved[name])
        assert opt["state"][key]["exp_avg"].abs().sum() > 0  # a real step was taken

    # the loaded optimizer state is usable
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1.0)
    fresh.load_state_dict(opt)
    assert fresh.param_groups[0]["lr"] == 1e-3

    # the RNG state restores the same random stream
    torch.set_rng_state(loaded["rng"])
    a = torch.rand(4)
    torch.set_rng_state(state["rng"])
    assert torch.equal(a, torch.rand(4))

    summary = json.loads((tmp_path / "trainer_state.json").read_text())
    assert summary == meta


def test_save_state_inside_write_checkpoint(tmp_path):
    state, _, _ = _trainer_state()
    checkpoints = tmp_path / "checkpoints"

    final = write_checkpoint(checkpoints, 42, lambda d: save_state(d, state, {"step": 42}))

    assert sorted(p.name for p in final.iterdir()) == ["trainer_state.json", "trainer_state.pt"]
    assert load_state(checkpoints / LAST)["step"] == 42
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 42


def test_load_state_refuses_pickled_code(tmp_path):
    torch.save({"step": 1, "thing": Opaque(3)}, tmp_path / "trainer_state.pt")
    # the file itself is fine: unrestricted loading would succeed
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=False)["thing"].value == 3

    with pytest.raises(ConfigError, match=r"trainer state .*trainer_state\.pt.* refused.*Opaque"):
        load_state(tmp_path)


def test_load_state_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path)


def test_a_killed_resave_is_put_back_and_partial_folders_removed(tmp_path):
    from vlrm.checkpoint import clean_leftovers

    ckpt = tmp_path / "checkpoints"
    write_checkpoint(ckpt, 2, lambda p: (p / "weights.bin").write_bytes(b"good"))
    # Killed between moving step-2 aside and renaming its new copy into place:
    os.replace(ckpt / "step-2", ckpt / ".step-2.stale-999")
    (ckpt / ".step-2.partial-999").mkdir()
    (ckpt / ".step-3.partial-998").mkdir()
    assert not (ckpt / "last").exists()  # `last` dangles

    clean_leftovers(ckpt)

    assert (ckpt / "last" / "weights.bin").read_bytes() == b"good"
    assert sorted(p.name for p in ckpt.iterdir()) == ["last", "step-2"]
