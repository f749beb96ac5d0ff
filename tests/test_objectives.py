"""The estimators, by hand on 2 images x 3 captions, and each one training the real tiny models.

The hand example (rewards per token; a sequence reward sits on a caption's last token, a
penalty where it fell):

    image 0   c0  [0, -1, 2]   returns [1, 1, 2]   total 1
              c1  [0, 3]       returns [3, 3]      total 3
              c2  [2]          returns [2]         total 2     group mean 2, std 1
    image 1   c3  [0, 0, 4]    returns [4, 4, 4]   total 4
              c4  [1, 0, 1]    returns [2, 1, 1]   total 2
              c5  [-0.5, 3.5]  returns [3, 3.5]    total 3     group mean 3, std 1

14 real tokens; log pi = -1 at every token unless a test says otherwise.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from attrs import evolve

from vlrm import rl
from vlrm.distributed import World
from vlrm.errors import ConfigError
from vlrm.objective import A2C, StepBatch, minibatch_images, select_images
from vlrm.rewards import CompositeReward, RewardTerm, group_standardize
from vlrm.structs import PolicyOutput, RewardOutput, Rollout
from vlrm.trainer import Trainer, TrainerConfig
from vlrm_plugins.estimators import GRPO, RLOO, SCST, DrGRPO, PPOClip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from a2c_reference import REFERENCE, ROOT, a2c_rows  # noqa: E402

REWARDS = torch.tensor([[0, -1, 2], [0, 3, 0], [2, 0, 0],
                        [0, 0, 4], [1, 0, 1], [-0.5, 3.5, 0]], dtype=torch.float64)
LENGTHS = [3, 2, 1, 3, 3, 2]
MASK = torch.arange(3).expand(6, 3) < torch.tensor(LENGTHS).unsqueeze(1)
GROUP = torch.tensor([0, 0, 0, 1, 1, 1])
RETURNS = torch.tensor([[1, 1, 2], [3, 3, 0], [2, 0, 0],
                        [4, 4, 4], [2, 1, 1], [3, 3.5, 0]], dtype=torch.float64)


def rollout(logprobs=None):
    logprobs = torch.full((6, 3), -1.0, dtype=torch.float64) if logprobs is None else logprobs
    return Rollout(images=["img0", "img1"], image_ids=["0", "1"], group=GROUP,
                   tokens=torch.ones(6, 3, dtype=torch.long), mask=MASK,
                   logprobs=logprobs * MASK, captions=[f"c{i}" for i in range(6)])


def batch(valid=None):
    valid = torch.ones(6, dtype=torch.bool) if valid is None else valid
    mask = MASK & valid.unsqueeze(1)
    return StepBatch(rollout=rollout(), rewards=REWARDS * mask, mask=mask, valid=valid)


def output(logprobs=None):
    logprobs = torch.full((6, 3), -1.0, dtype=torch.float64) if logprobs is None else logprobs
    return PolicyOutput(logprobs=logprobs, entropy=torch.zeros(6, 3, dtype=torch.float64),
                        hidden=torch.zeros(6, 3, 4, dtype=torch.float64))


def ready(objective, policy=None, reward=None):
    objective.setup(policy or object(), reward, World(), seed=0)
    return objective


def test_the_returns_of_the_hand_example():
    assert torch.equal(rl.discounted_returns(REWARDS, MASK, 1.0), RETURNS * MASK)


def test_rloo_baseline_is_the_mean_of_the_other_captions_of_the_image():
    targets = ready(RLOO()).prepare(batch())
    # leave-one-out baselines: c0 (3+2)/2, c1 (1+2)/2, c2 (1+3)/2, c3 (2+3)/2, c4 (4+3)/2, c5 (4+2)/2
    expected = torch.tensor([[-1.5, -1.5, -0.5], [1.5, 1.5, 0], [0, 0, 0],
                             [1.5, 1.5, 1.5], [-1.5, -2.5, -2.5], [0, 0.5, 0]], dtype=torch.float64)
    assert torch.allclose(targets.advantages, expected)
    loss, stats = ready(RLOO()).loss(targets, output(), None)
    # token mean of -A * log pi = sum(A) / 14 = (-3.5 + 3 + 0 + 4.5 - 6.5 + 0.5) / 14
    assert loss.item() == pytest.approx(-2.0 / 14)
    assert stats["loss/policy"].item() == pytest.approx(-2.0 / 14)


def test_grpo_scales_by_the_group_std_and_averages_each_caption_first():
    targets = ready(GRPO()).prepare(batch())
    expected = torch.tensor([[-1, -1, 0], [1, 1, 0], [0, 0, 0],
                             [1, 1, 1], [-1, -2, -2], [0, 0.5, 0]], dtype=torch.float64) / (1 + 1e-4)
    assert torch.allclose(targets.advantages, expected)
    loss, _ = ready(GRPO()).loss(targets, output(), None)
    # caption means: -2/3, 1, 0, 1, -5/3, 1/4; their mean over 6 captions
    assert loss.item() == pytest.approx((-2 / 3 + 1 + 0 + 1 - 5 / 3 + 0.25) / 6 / (1 + 1e-4))


def test_grpo_batch_scaling_uses_the_std_of_every_caption_total():
    targets = ready(GRPO(scale_rewards="batch")).prepare(batch())
    std = torch.tensor([1, 3, 2, 4, 2, 3.0]).std().item()  # Bessel-corrected, as torch.std
    assert targets.advantages[3, 0].item() == pytest.approx(1 / (std + 1e-4))
    none = ready(GRPO(scale_rewards="none")).prepare(batch())
    assert none.advantages[4].tolist() == [-1.0, -2.0, -2.0]


def test_dr_grpo_neither_scales_nor_normalises_by_length():
    objective = ready(DrGRPO(max_tokens=4))
    targets = objective.prepare(batch())
    assert targets.advantages[0].tolist() == [-1.0, -1.0, 0.0]
    loss, _ = objective.loss(targets, output(), None)
    # sum(A) / (6 captions x 4 tokens) = (-2 + 2 + 0 + 3 - 5 + 0.5) / 24
    assert loss.item() == pytest.approx(-1.5 / 24)


class GreedyDouble:
    """A stand-in policy whose greedy captions the test double reward scores 2.5 and 2."""

    def sample(self, images, image_ids, num_samples, greedy=False):
        assert greedy and num_samples == 1
        return Rollout(images=list(images), image_ids=list(image_ids), group=torch.arange(2),
                       tokens=torch.ones(2, 1, dtype=torch.long), mask=torch.ones(2, 1, dtype=torch.bool),
                       logprobs=torch.zeros(2, 1), captions=["g0", "g1"])


def greedy_reward(rollout):
    return RewardOutput(sequence=torch.tensor([2.5, 2.0]))


def test_scst_baseline_is_the_greedy_caption_reward():
    objective = ready(SCST(), GreedyDouble(), greedy_reward)
    targets = objective.prepare(batch())
    expected = torch.tensor([[-1.5, -1.5, -0.5], [0.5, 0.5, 0], [-0.5, 0, 0],
                             [2, 2, 2], [0, -1, -1], [1, 1.5, 0]], dtype=torch.float64)
    assert torch.allclose(targets.advantages, expected)
    assert targets.stats["beats_greedy"] == pytest.approx(3 / 6)  # c1, c3, c5


def test_scst_refuses_a_policy_that_cannot_decode_greedily():
    class Sampler:
        def sample(self, images, image_ids, num_samples):
            pass

    with pytest.raises(ConfigError, match="GreedySampler"):
        ready(SCST(), Sampler(), greedy_reward)


def test_a2c_loss_by_hand_with_fixed_values():
    objective = A2C(vf_coef=0.5)
    objective._reduce = rl.identity
    targets = objective.prepare(batch())
    assert targets.advantages is None  # from the update's own values
    values = torch.full((6, 3), 0.5, dtype=torch.float64, requires_grad=True)
    loss, stats = objective.loss(targets, output(), values)
    # sum R = 34.5 over 14 tokens, A = R - 0.5; sum (R - 0.5)^2 = 72.25
    assert stats["loss/policy"].item() == pytest.approx(27.5 / 14)
    assert stats["loss/value"].item() == pytest.approx(72.25 / 14)
    assert loss.item() == pytest.approx(27.5 / 14 + 0.5 * 72.25 / 14)


def test_a_dropped_caption_leaves_its_group_statistics():
    valid = torch.tensor([True, False, True, True, True, True])
    targets = ready(RLOO()).prepare(batch(valid))
    assert targets.advantages[0].tolist() == [-1.0, -1.0, 0.0]  # baseline: c2 alone
    assert targets.advantages[1].abs().sum() == 0
    grpo = ready(GRPO(scale_rewards="none")).prepare(batch(valid))
    assert grpo.advantages[2, 0].item() == pytest.approx(0.5)  # mean of c0, c2 = 1.5


def test_ppo_clip_takes_the_pessimistic_term_by_hand():
    objective = ready(PPOClip(RLOO(), epochs=1, minibatches=1, clip=0.2))
    targets = objective.prepare(batch())
    new = torch.full((6, 3), -1.0 + math.log(1.5), dtype=torch.float64)  # ratio 1.5
    loss, stats = objective.loss(targets, output(new), None)
    # A > 0 (sum 8): clipped at 1.2; A < 0 (sum -10): the ratio 1.5 itself; A = 0: nothing
    assert loss.item() == pytest.approx((-1.2 * 8 + 1.5 * 10) / 14)
    assert stats["ppo/clip_fraction"].item() == pytest.approx(6 / 14)
    assert stats["ppo/approx_kl"].item() == pytest.approx(0.5 - math.log(1.5))
    # At ratio 1 the surrogate is -mean(A) (its gradient is the plain policy gradient's).
    same, same_stats = objective.loss(targets, output(), None)
    assert same.item() == pytest.approx(2.0 / 14) and same_stats["ppo/clip_fraction"] == 0


def test_ppo_k3_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    assert rl.k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0
    d = math.log(2.0)  # log pi_ref - log pi
    assert rl.k3_kl(torch.tensor([-1.0 - d]), torch.tensor([-1.0])).item() == pytest.approx(2 - d - 1)


def test_k3_penalty_on_padding_is_zero_even_where_a_suppressed_pad_scores_the_smallest_float():
    # The shapes captioner suppresses its pad token: the policy scores padding at about
    # finfo.min while the reference's log-probs are zeroed there; unmasked, exp(d) is inf and
    # the masked sum NaN (every PPO-clip step with kl_coef was skipped on the shapes world).
    tiny = torch.finfo(torch.float32).min
    logprobs = torch.tensor([[-1.0, -2.0, tiny]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    kl = rl.k3_kl(logprobs, ref, mask)
    assert torch.isfinite(rl.k3_kl(logprobs, ref)).tolist() == [[True, True, False]]
    assert kl[0, 2].item() == 0 and kl[0, 1].item() == pytest.approx(math.e - 1 - 1)
    rl.aggregate(kl, mask, "token", num_tokens=mask.sum(), num_captions=torch.tensor(1)).backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 2].item() == 0


def test_group_normalisation_of_each_term_before_the_weighted_sum():
    per_token = REWARDS.float() * MASK
    normed = group_standardize(per_token, MASK, GROUP, eps=0.0)
    # totals 1, 3, 2 | 4, 2, 3 -> z-scores -1, 1, 0 | 1, -1, 0 (std 1 in both groups)
    assert torch.allclose(normed.sum(1), torch.tensor([-1.0, 1, 0, 1, -1, 0]), atol=1e-6)
    assert normed[0, 1].item() == pytest.approx(-1.0)  # the penalty stays on its token

    def big(r):  # the same ranking as REWARDS' totals, a hundred times the spread
        return RewardOutput(sequence=REWARDS.float().sum(1) * 100)

    def small(r):
        return RewardOutput(sequence=-REWARDS.float().sum(1))

    plain = CompositeReward({"big": RewardTerm(big), "small": RewardTerm(small)})
    decoupled = CompositeReward({"big": RewardTerm(big), "small": RewardTerm(small)},
                                group_normalize=True)
    assert plain(rollout()).token.sum(1)[1] > 100  # the big term drowns the small one
    totals = decoupled(rollout()).token.sum(1)
    assert torch.allclose(totals, torch.zeros(6), atol=1e-3)  # equal weights, opposite z-scores


def test_group_normalisation_gives_a_tied_group_nothing_at_any_token():
    # Group 0: three copies of one caption (per-token log-probs -1, -2, -3 each); group 1: the
    # same penalty count (-1) on different tokens. Scaling by std + eps would put per-token
    # rewards of about 1e4 on these captions and returns-to-go of that size between them
    # (the A2C value loss reached 3e6 on the shapes world); a tie has nothing to rank.
    mask = torch.ones(6, 3, dtype=torch.bool)
    per_token = torch.tensor([[-1.0, -2, -3]] * 3 + [[-1.0, 0, 0], [0, -1, 0], [0, 0, -1]])
    normed = group_standardize(per_token, mask, GROUP)
    assert torch.equal(normed, torch.zeros(6, 3))
    # float noise between identical captions is a tie too; a real spread is not
    noisy = per_token.clone()
    noisy[1, 2] += 1e-6
    assert torch.equal(group_standardize(noisy, mask, GROUP)[:3], torch.zeros(3, 3))
    spread = per_token.clone()
    spread[1, 2] = -2.0  # totals -6, -5, -6: z-scores -0.577, 1.155, -0.577
    z = group_standardize(spread, mask, GROUP, eps=0.0).sum(1)
    assert torch.allclose(z[:3], torch.tensor([-1.0, 2.0, -1.0]) / math.sqrt(3), atol=1e-5)

    def same_penalty_count(r):
        return RewardOutput(token=torch.tensor([[-1.0, 0, 0], [0, -1, 0], [-1, 0, 0],
                                                [0, 0, -1], [0, -1, 0], [-1, 0, 0]]))

    out = CompositeReward({"repeat": RewardTerm(same_penalty_count)}, group_normalize=True)(
        rollout())
    assert out.metrics["repeat/group_tied"] == 1.0 and torch.equal(out.token, torch.zeros(6, 3))


def test_minibatches_are_strided_parts_of_the_images():
    assert minibatch_images(4, 2) == [[0, 2], [1, 3]]
    part, rows = select_images(rollout(), [1])
    assert rows.tolist() == [3, 4, 5] and part.group.tolist() == [0, 0, 0]
    assert part.captions == ["c3", "c4", "c5"] and part.images == ["img1"]


def test_estimator_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="scale_rewards"):
        GRPO(scale_rewards="rank")
    with pytest.raises(ConfigError, match="gamma"):
        RLOO(gamma=2.0)
    with pytest.raises(ConfigError, match="clip"):
        PPOClip(RLOO(), clip=0.0)
    with pytest.raises(ConfigError, match="aggregation"):
        GRPO(aggregation="mean")
    with pytest.raises(TypeError):  # A2C's loss is the paper's token mean, not a setting
        A2C(aggregation="sequence")


# -- the real tiny models ---------------------------------------------------------------

ESTIMATORS = {
    "a2c": lambda: A2C(value_lr=1e-2),
    "rloo": RLOO,
    "grpo": GRPO,
    "dr_grpo": DrGRPO,
    "scst": SCST,
    "ppo_grpo": lambda: PPOClip(GRPO(), epochs=2, minibatches=2, kl_coef=0.1),
    "ppo_a2c": lambda: PPOClip(A2C(), epochs=2, minibatches=2),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_each_estimator_trains_the_tiny_blip2(name, tiny_policy_factory, tiny_clip, tmp_path):
    from vlrm_plugins.bundled_photos import bundled_photos
    from vlrm_plugins.text_penalties import RepetitionPenalty

    policy = tiny_policy_factory(seed=0, max_new_tokens=6, init_std=0.5)
    reward = CompositeReward({"clip": RewardTerm(tiny_clip), "repeat": RewardTerm(RepetitionPenalty())})
    config = TrainerConfig(max_steps=2, images_per_step=2, samples_per_image=3, policy_lr=1e-3,
                           save_every=0, progress=False)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer = Trainer(policy, reward, bundled_photos(), config, tmp_path, objective=ESTIMATORS[name]())
    history = trainer.train()
    assert [row["step/skipped"] for row in history] == [0.0, 0.0]
    assert all(math.isfinite(row["loss/total"]) for row in history)
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    if name.startswith("ppo"):
        assert "ppo/clip_fraction" in history[-1] and "ppo/approx_kl" in history[-1]
    if name == "ppo_grpo":
        assert history[-1]["loss/kl"] >= 0
    if name == "scst":
        assert "objective/greedy_reward" in history[-1]
    has_critic = name in ("a2c", "ppo_a2c")
    assert ("grad/value_norm" in history[-1]) is has_critic
    assert ((tmp_path / "checkpoints" / "last" / "value_head.safetensors").is_file()) is has_critic
    meta = json.loads((tmp_path / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert meta["objective"] == type(trainer.objective).__name__


def test_a_group_estimator_refuses_one_sample_per_image(tiny_policy_factory, tiny_clip, tmp_path):
    from vlrm_plugins.bundled_photos import bundled_photos

    config = TrainerConfig(max_steps=1, images_per_step=2, samples_per_image=1, save_every=0,
                           progress=False)
    trainer = Trainer(tiny_policy_factory(seed=0, max_new_tokens=4), tiny_clip, bundled_photos(),
                      config, tmp_path, objective=RLOO())
    with pytest.raises(ConfigError, match="samples_per_image >= 2"):
        trainer.train()


def test_minibatches_must_divide_each_process_images(tiny_policy_factory, tiny_clip, tmp_path):
    from vlrm_plugins.bundled_photos import bundled_photos

    config = TrainerConfig(max_steps=1, images_per_step=3, samples_per_image=2, progress=False)
    with pytest.raises(ConfigError, match="minibatches 2 must divide the 3 images"):
        Trainer(tiny_policy_factory(seed=0, max_new_tokens=4), tiny_clip, bundled_photos(),
                config, tmp_path, objective=PPOClip(GRPO()))


def test_a2c_metrics_rows_are_those_of_the_trainer_before_objectives(tmp_path):
    """configs/tiny.yaml, 5 steps, whitened advantages and an entropy bonus: every metric of
    every row as the pre-refactor trainer wrote it (tests/a2c_reference.py).

    Since BLIP-2's scoring pass runs each image's prefix once for its K captions (issue 17),
    the losses, values and gradient norms agree to float32 rounding, not bit for bit: the
    policy loss and the mean advantage are sums of near-cancelling terms, which moved by up
    to 1e-7 absolute (measured 9.9e-8). Rewards and captions are unchanged. On another CPU
    (AMD EPYC against the reference's machine) the float32 kernels round differently: rewards
    moved by up to 2e-6 relative and the losses by up to 3e-6 absolute, captions identical;
    the bounds below allow that noise and nothing a changed update would produce.
    """
    rows = a2c_rows(tmp_path / "run")
    reference = [json.loads(line) for line in REFERENCE.read_text().splitlines()]
    assert len(rows) == len(reference) == 5
    for got, want in zip(rows, reference):
        assert set(got) == set(want), set(got) ^ set(want)
        for key, value in want.items():
            if key.startswith("caption"):
                assert got[key] == value, (got["step"], key)
                continue
            rounding = 1e-8 if key.startswith("reward") else 1e-5
            assert got[key] == pytest.approx(value, rel=1e-5, abs=rounding), (got["step"], key)


def test_estimator_configs_differ_from_their_base_only_where_they_say():
    """configs/shapes/demo.yaml is vlrm_rs.yaml with the sweep's a2c_gn_cos fragment (A2C, the
    reward's per-term group normalisation, the cosine decay) in 1,000 steps; configs/grpo.yaml and
    rloo.yaml are vlrm.yaml with the estimator swapped (an included file's sections are
    replaced whole, so a stray section there would silently reset settings)."""
    from vlrm_shapes.demo import _demo_parser

    from vlrm.cli import build_parser

    def resolved(parser, *files):
        cfg = parser.parse_args([a for f in files for a in ("--config", str(ROOT / "configs" / f))])
        cfg = cfg.as_dict()
        cfg.pop("config", None)  # the files themselves
        return cfg

    def differences(a, b, prefix=""):
        keys = set(a) | set(b)
        out = set()
        for k in keys:
            if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
                out |= differences(a[k], b[k], f"{prefix}{k}.")
            elif a.get(k) != b.get(k):
                out.add(f"{prefix}{k}")
        return out

    demo = resolved(_demo_parser(), "shapes/demo.yaml")
    assert demo["objective"]["class_path"] == "vlrm.objective.A2C"
    assert differences(demo, resolved(_demo_parser(), "shapes/vlrm_rs.yaml")) == {
        "trainer.max_steps", "output_dir", "reward.group_normalize", "trainer.lr_schedule"}
    # the demo runs what docs/estimators.md measured: vlrm_rs.yaml + the sweep's a2c_gn_cos
    # fragment (with the demo's own step count, which the sweep passes on its command line)
    swept = resolved(_demo_parser(), "shapes/vlrm_rs.yaml", "shapes/objectives/a2c_gn_cos.yaml")
    assert differences(demo, swept) == {"trainer.max_steps", "output_dir"}
    for name, estimator in (("grpo.yaml", "GRPO"), ("rloo.yaml", "RLOO")):
        config = resolved(build_parser(), name)
        assert config["objective"]["class_path"] == f"vlrm_plugins.estimators.{estimator}"
        assert {d for d in differences(config, resolved(build_parser(), "vlrm.yaml"))
                if not d.startswith("objective.")} == {"output_dir"}
    # grpo_gn.yaml: the grpo fragment plus the composite reward's per-term group normalisation,
    # the reward terms of vlrm_rs.yaml kept (a later --config merges keys)
    base = resolved(_demo_parser(), "shapes/vlrm_rs.yaml", "shapes/objectives/grpo.yaml")
    gn = resolved(_demo_parser(), "shapes/vlrm_rs.yaml", "shapes/objectives/grpo_gn.yaml")
    assert differences(gn, base) == {"reward.group_normalize"} and gn["reward"]["group_normalize"]
    a2c = resolved(_demo_parser(), "shapes/vlrm_rs.yaml", "shapes/objectives/a2c.yaml")
    a2c_gn = resolved(_demo_parser(), "shapes/vlrm_rs.yaml", "shapes/objectives/a2c_gn.yaml")
    assert differences(a2c_gn, a2c) == {"reward.group_normalize"}
    for name, gn in (("grpo_gn", gn), ("a2c_gn", a2c_gn)):  # the *_cos fragments: + the decay
        cos = resolved(_demo_parser(), "shapes/vlrm_rs.yaml", f"shapes/objectives/{name}_cos.yaml")
        assert differences(cos, gn) == {"trainer.lr_schedule"}
        assert cos["trainer"]["lr_schedule"] == "cosine"
    assert a2c["objective"] == resolved(_demo_parser(), "shapes/vlrm_rs.yaml")["objective"]
