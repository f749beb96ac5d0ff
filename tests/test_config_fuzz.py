"""Malformed config files, generated many ways: ``vlrm-run`` always exits 2 with a short
message naming the problem, never a traceback, and never starts training."""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlrm.cli import run
from vlrm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
NAN = float("nan")

# Values that are wrong for a key, whatever the rest of the config says.
WRONG = {
    ("trainer", "max_steps"): [0, -5, "ten", [1], {"a": 1}, None, 1.5],
    ("trainer", "images_per_step"): [0, -1, "four", [4], None],
    ("trainer", "samples_per_image"): [0, "two", [], 2.5],
    ("trainer", "policy_lr"): [-1.0, "fast", [1e-4], NAN],
    ("objective", "init_args", "gamma"): [1.5, -0.1, "one", NAN],
    ("objective", "init_args", "value_hidden"): [0, -3, "wide", NAN],
    ("objective", "class_path"): ["vlrm.objective.NoSuch", 3, "vlrm.rewards.CompositeReward"],
    ("trainer", "max_grad_norm"): [-1.0, NAN, "big"],
    ("trainer", "sample_seeding"): ["random", 3, []],
    ("trainer", "parallel"): ["zero", 1],
    ("trainer", "keep_last"): [-1, "all"],
    ("trainer", "progress"): ["maybe", [True], 7],
    ("reward", "terms"): [[], "clip", 5, {}],
    ("reward", "terms", "clip", "weight"): ["heavy", [1], {}, None, NAN, float("inf")],
    ("reward", "terms", "clip", "normalize"): ["yes please", 3, None],
    ("reward", "terms", "clip", "reward"): ["clip", 3, [], {"class_path": "no.such.Reward"},
                                            {"init_args": {"seed": 1}}],
    ("reward", "terms", "clip", "reward", "init_args", "seed"): ["one", [1]],
    ("policy",): ["blip2", 1, [], {"class_path": "vlrm_plugins.blip2_opt.no_such_builder"},
                  {"class_path": "collections.OrderedDict"}],
    ("policy", "init_args", "max_new_tokens"): [0, -3, "long", [], None],
    ("policy", "init_args", "seed"): ["zero", 0.5],
    ("data",): ["images/", 3, {"class_path": "vlrm.data.ImageFolder",
                               "init_args": {"root": "/nonexistent/images"}}],
    ("output_dir",): [[], {"a": 1}],
}
REQUIRED = [("policy",), ("data",), ("reward", "terms", "clip", "reward"),
            ("policy", "class_path"), ("data", "class_path")]
MAPPINGS = [(), ("trainer",), ("reward",), ("reward", "terms", "clip"), ("policy", "init_args")]
KNOWN = {"policy", "reward", "data", "trainer", "output_dir", "eval", "resume", "config",
         "terms", "clip", "weight", "normalize", "seed", "max_new_tokens", "class_path",
         "init_args", "reward"}


def _set(config: dict, path: tuple, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def _delete(config: dict, path: tuple) -> dict:
    config = copy.deepcopy(config)
    node = config
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return config


wrong_value = st.sampled_from(sorted(WRONG, key=str)).flatmap(
    lambda path: st.sampled_from(WRONG[path]).map(lambda v: yaml.safe_dump(_set(BASE, path, v))))
unknown_key = st.tuples(
    st.sampled_from(MAPPINGS),
    st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda k: k not in KNOWN),
    st.one_of(st.integers(), st.text(max_size=8), st.booleans()),
).map(lambda t: yaml.safe_dump(_set(BASE, t[0] + (t[1],), t[2])))
missing_key = st.sampled_from(REQUIRED).map(lambda path: yaml.safe_dump(_delete(BASE, path)))
not_a_mapping = st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=20),
                          st.none()).map(yaml.safe_dump)
_TEXT = yaml.safe_dump(BASE)
# Free-form names stay valid with any character in them: the output folder and the reward
# term's name ("c[lip" is a term like any other). Break the text anywhere else.
_FREE_FORM = ("output_dir:", "clip:")
_SAFE_TO_BREAK = [i for i in range(len(_TEXT)) if not _TEXT[
    _TEXT.rfind("\n", 0, i) + 1:_TEXT.find("\n", i)].strip().startswith(_FREE_FORM)]
broken_syntax = st.tuples(st.sampled_from(_SAFE_TO_BREAK), st.sampled_from(["[", "{", "'", '"', "@", "`"])
                          ).map(lambda t: _TEXT[:t[0]] + t[1] + _TEXT[t[0]:])
garbage = st.binary(min_size=1, max_size=64).map(lambda b: b.decode("latin-1"))

malformed = st.one_of(wrong_value, unknown_key, missing_key, not_a_mapping, broken_syntax, garbage)


@pytest.fixture(autouse=True)
def never_train(monkeypatch):
    def refuse(self):
        raise AssertionError("a malformed config was accepted and training started")

    monkeypatch.setattr(Trainer, "train", refuse)


def run_config(text: str) -> tuple[object, str]:
    """Exit status and stderr of ``vlrm-run --config <a file holding text>``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = run(["--config", str(path), "--output_dir", str(Path(tmp) / "out")])
            except SystemExit as exc:
                status = exc.code
    return status, err.getvalue()


def assert_refused(text: str) -> None:
    status, message = run_config(text)
    assert status == 2, (text, message)
    assert message.startswith("vlrm-run: error: ") and "Traceback" not in message, message
    assert len(message.strip().splitlines()) <= 12, message


@pytest.mark.slow
@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=malformed)
def test_malformed_config_files_exit_2_with_a_message_and_no_traceback(text):
    assert_refused(text)


@pytest.mark.slow
@pytest.mark.parametrize("path, value", [(p, v) for p in sorted(WRONG, key=str) for v in WRONG[p]],
                         ids=lambda x: ".".join(x) if isinstance(x, tuple) else repr(x)[:20])
def test_every_listed_wrong_value_exits_2(path, value):
    assert_refused(yaml.safe_dump(_set(BASE, path, value)))
