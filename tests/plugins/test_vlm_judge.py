"""VLM-judge reward: P("yes") of a generative image-text model asked about each caption."""

import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.vlm_judge import VLMJudgeReward, answer_ids, tiny_vlm_judge, vlm_judge

CAPTIONS = [["a cat on a sofa", "a red bus", "two cups"], ["a rocket"], ["coffee", "a small dog"]]


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "instructblip"])
def judge(request):
    return tiny_vlm_judge(request.param, seed=1)


def _one_by_one(judge, image, caption):
    """The answer logits of one (image, caption) from one forward of the whole question, the
    text before the caption and the rest tokenised as the judge tokenises them."""
    head = judge._inputs(image, judge.head)
    tail = judge.tokenizer(caption + judge.tail, add_special_tokens=False)["input_ids"]
    ids = torch.cat([head["input_ids"], torch.tensor([tail])], dim=1)
    head.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    for key in ("token_type_ids", "mm_token_type_ids"):  # the text after the image: type 0
        if key in head:
            head[key] = torch.nn.functional.pad(head[key], (0, len(tail)))
    with torch.no_grad():
        return judge.model(**head).logits[0, -1]


def test_shared_image_prefill_equals_one_forward_per_caption(judge, photos):
    images = [img for _, img in photos[:3]]
    rollout = make_rollout(CAPTIONS, images=images)
    with torch.no_grad():
        logits = judge.answer_logits(images, rollout.group, rollout.captions)
    for b, caption in enumerate(rollout.captions):
        expected = _one_by_one(judge, images[int(rollout.group[b])], caption)
        torch.testing.assert_close(logits[b], expected, atol=2e-4, rtol=1e-4)


def test_the_score_is_p_yes_over_yes_and_no_and_passes_check_reward(judge, photos):
    images = [img for _, img in photos[:3]]
    rollout = make_rollout(CAPTIONS, images=images)
    out = check_reward(judge, rollout)
    for b, caption in enumerate(rollout.captions):
        p = torch.softmax(_one_by_one(judge, images[int(rollout.group[b])], caption).float(), -1)
        yes, no = p[judge.yes].sum(), p[judge.no].sum()
        assert out.sequence[b].item() == pytest.approx((yes / (yes + no)).item(), abs=1e-4)
    assert 0 <= out.metrics["yes_share"] <= 1


def test_logprob_score_is_log_p_yes_over_the_vocabulary(photos):
    images = [img for _, img in photos[:3]]
    rollout = make_rollout(CAPTIONS, images=images)
    ratio, raw = tiny_vlm_judge("llava", seed=1), tiny_vlm_judge("llava", seed=1, score="logprob")
    with torch.no_grad():
        logits = raw.answer_logits(images, rollout.group, rollout.captions)
    logp = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(raw(rollout).sequence, torch.logsumexp(logp[:, raw.yes], -1))
    assert (raw(rollout).sequence < 0).all() and not torch.equal(ratio(rollout).sequence,
                                                                  raw(rollout).sequence)


def test_judging_in_image_batches_changes_nothing(photos):
    images = [img for _, img in photos[:3]]
    rollout = make_rollout(CAPTIONS, images=images)
    judge = tiny_vlm_judge("llava", seed=1)
    whole = judge(rollout).sequence
    judge.batch_size = 1
    torch.testing.assert_close(judge(rollout).sequence, whole, atol=1e-5, rtol=1e-5)


def test_encoder_decoder_judge_reads_the_first_decoder_step(photos):
    judge = tiny_vlm_judge("blip2_t5", seed=1)
    images = [img for _, img in photos[:2]]
    rollout = make_rollout([["a cat", "a red bus"], ["a rocket"]], images=images)
    out = check_reward(judge, rollout)
    inputs = judge._inputs(images[1], judge.head + "a rocket" + judge.tail)
    start = torch.tensor([[judge.decoder_start_token_id]])
    with torch.no_grad():
        p = torch.softmax(judge.model(**inputs, decoder_input_ids=start).logits[0, -1].float(), -1)
    assert out.sequence[2].item() == pytest.approx((p[judge.yes].sum() / (p[judge.yes].sum() +
                                                     p[judge.no].sum())).item(), abs=1e-4)


def test_answer_ids_take_every_known_spelling_and_skip_blank_and_unknown_first_tokens():
    from vlrm_plugins.hf_tiny import build_tiny_captioner

    _, processor, _ = build_tiny_captioner("llava")
    tok = processor.tokenizer
    ids = answer_ids(tok, "yes")
    assert ids and all(tok.decode([i]).strip() for i in ids)
    assert all(tok(s, add_special_tokens=False)["input_ids"][0] in ids
               for s in ("yes", " yes", "Yes", " Yes") if tok.decode(
                   tok(s, add_special_tokens=False)["input_ids"][:1]).strip())


def test_bad_settings_are_named(tmp_path):
    from vlrm_plugins.hf_tiny import build_tiny_captioner

    model, processor, _ = build_tiny_captioner("llava")
    with pytest.raises(ConfigError, match="exactly once"):
        VLMJudgeReward(model, processor, prompt="<image> Is this right?")
    with pytest.raises(ConfigError, match="score must be one of"):
        VLMJudgeReward(model, processor, score="softmax")
    with pytest.raises(ConfigError, match="cannot tell the answers"):
        VLMJudgeReward(model, processor, answers=("yes", "yes"))
    with pytest.raises(ConfigError, match="does not exist"):
        vlm_judge(str(tmp_path / "missing"))
