"""Remote reward: a real `vlrm-serve-reward` process on localhost, and the `remote` reward term."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from vlrm.cli import run
from vlrm.errors import ConfigError, TrainingError
from vlrm.reward_server import RewardServer, merge, split
from vlrm.reward_wire import decode_output, decode_rollout, encode_output, encode_rollout
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.clip_reward import tiny_clip_reward
from vlrm_plugins.remote_reward import RemoteReward
from vlrm_plugins.text_penalties import RepetitionPenalty

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
CAPTIONS = [["a cat on a sofa", "a red bus red bus"], ["a rocket"], ["coffee", "two cups", "tea"]]
SERVED = {"class_path": "vlrm_plugins.clip_reward.tiny_clip_reward", "init_args": {"seed": 1}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path, port=0, env=None, extra=()):
    """A vlrm-serve-reward process serving the tiny CLIP; returns (process, url)."""
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"reward": SERVED, "port": port}))
    proc = subprocess.Popen([sys.executable, "-m", "vlrm.reward_server", "--config", str(config),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    return proc, line.split(" on ")[1].split(" ")[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = _serve(tmp_path_factory.mktemp("server"))
    yield url
    proc.kill()
    proc.wait()


@pytest.fixture
def rollout(photos):
    return make_rollout(CAPTIONS, images=[img for _, img in photos[:3]])


def test_the_wire_carries_a_rollout_and_an_output_exactly(rollout):
    back = decode_rollout(encode_rollout(rollout))
    assert back.captions == rollout.captions and back.image_ids == [str(i) for i in rollout.image_ids]
    for a, b in zip(back.images, rollout.images):
        assert a.mode == b.mode and a.tobytes() == b.tobytes()  # PNG: lossless
    for name in ("group", "tokens", "mask", "token_ends"):
        assert torch.equal(getattr(back, name), getattr(rollout, name))
    out = RepetitionPenalty()(rollout)
    again = decode_output(encode_output(out))
    assert again.sequence is None and torch.equal(again.token, out.token)
    with pytest.raises(ValueError, match="not a rollout"):
        decode_rollout(b'{"images": []}')


def test_merged_requests_score_as_each_alone(rollout, photos):
    reward = tiny_clip_reward(seed=1)
    other = make_rollout([["a dog"], ["a big red rocket", "rocket"]],
                         images=[img for _, img in photos[3:5]])
    merged = merge([rollout, other])
    assert merged.group.tolist() == rollout.group.tolist() + [3, 4, 4]
    parts = split(reward(merged), [rollout, other])
    torch.testing.assert_close(parts[0].sequence, reward(rollout).sequence)
    torch.testing.assert_close(parts[1].sequence, reward(other).sequence)
    token = split(RepetitionPenalty()(merged), [rollout, other])
    assert torch.equal(token[0].token, RepetitionPenalty()(rollout).token)


def test_a_real_server_scores_as_the_reward_in_process(server, rollout):
    remote = RemoteReward(server, retries=0)
    out = check_reward(remote, rollout)
    assert torch.equal(out.sequence, tiny_clip_reward(seed=1)(rollout).sequence)


def test_training_through_the_server_equals_training_in_process(server, tmp_path):
    fast = ["--trainer.max_steps", "3", "--trainer.progress", "false",
            "--policy.init_args.max_new_tokens", "6", "--trainer.save_every", "100"]
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump({"reward": {"terms": {"clip": {"reward": {
        "class_path": "remote", "init_args": {"url": server}}}}}}))
    rows = {}
    for name, extra in (("local", []), ("remote", ["--config", str(remote)])):
        assert run(["--config", TINY, *extra, *fast, "--output_dir", str(tmp_path / name)]) == 0
        rows[name] = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                      for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["local"]) == 3 and rows["remote"] == rows["local"]


def test_a_server_that_starts_late_is_waited_for(tmp_path, rollout):
    port = _free_port()
    remote = RemoteReward(f"http://127.0.0.1:{port}/score", retries=30, backoff=0.2)
    result = {}
    caller = threading.Thread(target=lambda: result.update(out=remote(rollout)))
    caller.start()
    time.sleep(1.0)  # the first tries find nothing listening
    proc, _ = _serve(tmp_path, port=port)
    try:
        caller.join(120)
        assert remote.attempts >= 2
        assert torch.equal(result["out"].sequence, tiny_clip_reward(seed=1)(rollout).sequence)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_server_is_retried_then_reported_by_url(tmp_path, rollout, capsys):
    proc, url = _serve(tmp_path)
    remote = RemoteReward(url, retries=2, backoff=0.05)
    remote(rollout)
    proc.kill()
    proc.wait()
    with pytest.raises(TrainingError, match=f"{url} gave no scores after 3 tries"):
        remote(rollout)
    assert remote.attempts == 1 + 3
    assert capsys.readouterr().err.count("retry") == 2


def test_a_run_whose_server_dies_stops_with_exit_1_naming_the_url(tmp_path, capsys):
    proc, url = _serve(tmp_path)
    proc.kill()
    proc.wait()
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump({"reward": {"terms": {"clip": {"reward": {
        "class_path": "remote", "init_args": {"url": url, "retries": 1, "backoff": 0.01}}}}}}))
    status = run(["--config", TINY, "--config", str(remote), "--trainer.max_steps", "2",
                  "--trainer.progress", "false", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1 and url in err and "no scores" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_token_size_limit_and_timeout_are_enforced(rollout, monkeypatch):
    server = RewardServer(tiny_clip_reward(seed=1), port=0, token="s3cret", max_request_bytes=10_000_000)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("VLRM_REWARD_TOKEN", raising=False)
        with pytest.raises(TrainingError, match="401: missing or wrong token"):
            RemoteReward(server.url, retries=3)(rollout)
        monkeypatch.setenv("VLRM_REWARD_TOKEN", "s3cret")
        assert RemoteReward(server.url)(rollout).sequence.shape == (6,)
        server.max_request_bytes = 1000
        with pytest.raises(TrainingError, match="413: request of .* bytes is over"):
            RemoteReward(server.url, retries=3)(rollout)
        with pytest.raises(TrainingError, match="over max_request_bytes 100"):
            RemoteReward(server.url, max_request_bytes=100)(rollout)
        server.max_request_bytes = 10_000_000
        slow = RemoteReward(server.url, timeout=1e-4, retries=1, backoff=0.0)
        with pytest.raises(TrainingError, match="gave no scores after 2 tries .*timed out"):
            slow(rollout)
    finally:
        server.shutdown()


def test_a_failing_reward_is_reported_at_once_with_its_message(rollout):
    def broken(_):
        raise RuntimeError("the judge model ran out of memory")

    server = RewardServer(broken, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = RemoteReward(server.url, retries=3)
        with pytest.raises(TrainingError, match="500: the reward function failed: RuntimeError: the judge"):
            remote(rollout)
        assert remote.attempts == 1
    finally:
        server.shutdown()


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ConfigError, match="url must start with http"):
        RemoteReward("localhost:8765")
    with pytest.raises(ConfigError, match="timeout > 0"):
        RemoteReward("http://localhost:8765/score", timeout=0)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"reward": {"class_path": "no_such_reward"}}))
    out = subprocess.run([sys.executable, "-m", "vlrm.reward_server", "--config", str(config)],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "no_such_reward" in out.stderr and "Traceback" not in out.stderr
