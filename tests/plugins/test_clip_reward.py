import pytest
import torch
import torch.nn.functional as F

from vlrm.errors import ConfigError
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.clip_reward import (ClipReward, clip_reward, save_open_clip_dir,
                                      tiny_clip_config)


@pytest.fixture
def rollout(photos):
    images = [img for _, img in photos[:3]]
    return make_rollout([["a cat on a sofa", "a red bus"], ["a rocket"], ["coffee", "two cups"]],
                        images=images)


def test_passes_the_reward_contract(tiny_clip, rollout):
    out = check_reward(tiny_clip, rollout)
    assert out.sequence is not None and out.token is None


def test_score_is_scaled_cosine_similarity(tiny_clip, rollout):
    model, tok, prep = tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess
    with torch.no_grad():
        img = model.encode_image(torch.stack([prep(i) for i in rollout.images]))
        txt = model.encode_text(tok(list(rollout.captions)))
    expected = (F.normalize(txt, dim=-1) * F.normalize(img, dim=-1)[rollout.group]).sum(-1)
    got = tiny_clip(rollout).sequence
    assert torch.allclose(got, expected, atol=1e-5)
    scaled = ClipReward(model, prep, tok, scale=2.5, cache_size=0)
    assert torch.allclose(scaled(rollout).sequence, 2.5 * expected, atol=1e-5)


def test_truncated_share(tiny_clip, photos):
    long = " ".join(["word"] * (tiny_clip.context_length + 5))
    rollout = make_rollout([["short caption", long, "another short one", long]],
                           images=[photos[0][1]])
    assert tiny_clip(rollout).metrics["truncated"] == pytest.approx(0.5)


def test_image_embeddings_are_cached_by_id(rollout, tiny_clip):
    reward = ClipReward(tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer, cache_size=2)
    batches = []
    hook = reward.model.visual.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    try:
        first = reward(rollout).sequence
        again = reward(rollout).sequence
    finally:
        hook.remove()
    # 3 images encoded once; the second call found 2 in the bounded cache and encoded 1
    assert batches == [3, 1]
    assert torch.allclose(first, again, atol=1e-6)
    assert len(reward._cache) == 2


def test_local_dir_round_trip(tiny_clip, rollout, tmp_path):
    save_open_clip_dir(tiny_clip.model, tiny_clip_config(), str(tmp_path))
    loaded = clip_reward(f"local-dir:{tmp_path}")
    assert torch.allclose(loaded(rollout).sequence, tiny_clip(rollout).sequence, atol=1e-6)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="NoSuchModel"):
        clip_reward("NoSuchModel-1", pretrained=None)


def test_trimmed_text_encoding_equals_full_context(tiny_clip):
    """Dropping the padding columns after the longest caption changes no embedding."""
    from vlrm_plugins.clip_reward import encode_text_trimmed

    captions = ["a dog", "a red square and a small blue circle on a white table", ""]
    tokens = tiny_clip.tokenizer(captions)
    assert int((tokens[:, -8:] != 0).sum()) == 0  # the context is longer than every caption
    with torch.no_grad():
        want = tiny_clip.model.encode_text(tokens)
        got = encode_text_trimmed(tiny_clip.model, tokens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_siglip_model_scores_with_its_own_sigmoid_or_the_cosine(rollout, tmp_path):
    """A tiny SigLIP built from an open_clip config (bidirectional text tower, last-token
    pooling, a learned logit bias), saved and loaded through ``local-dir:`` as a real one."""
    import open_clip

    from vlrm_plugins.clip_reward import tiny_siglip_config

    cfg = tiny_siglip_config()
    torch.manual_seed(3)
    saved = open_clip.CLIP(**cfg)
    with torch.no_grad():  # a bias and scale that put the pairs' probabilities mid-range
        saved.logit_bias.fill_(-0.5)
        saved.logit_scale.fill_(2.0)
    save_open_clip_dir(saved, cfg, str(tmp_path))
    sigmoid = clip_reward(f"local-dir:{tmp_path}", score="sigmoid", cache_size=0)
    cosine = clip_reward(f"local-dir:{tmp_path}", cache_size=0)
    assert sigmoid.model.logit_bias.item() == -0.5  # the model's own, loaded
    check_reward(sigmoid, rollout)
    # open_clip's own forward: unit features, exp(logit scale) and the bias
    model, prep, tok = sigmoid.model, sigmoid.preprocess, sigmoid.tokenizer
    with torch.no_grad():
        img, txt, scale, bias = model(torch.stack([prep(i) for i in rollout.images]),
                                      tok(list(rollout.captions)))
    cos = (txt * img[rollout.group]).sum(-1)
    assert torch.allclose(cosine(rollout).sequence, cos, atol=1e-5)
    probability = sigmoid(rollout).sequence
    assert torch.allclose(probability, torch.sigmoid(scale * cos + bias), atol=1e-6)
    assert ((probability > 0) & (probability < 1)).all() and probability.std() > 1e-3
    # the same order of an image's captions either way (the sigmoid is monotone)
    first = rollout.group == 0
    assert torch.equal(probability[first].argsort(), cos[first].argsort())


def test_the_sigmoid_score_needs_a_siglip_model(tiny_clip):
    with pytest.raises(ConfigError, match="score 'sigmoid' needs a SigLIP model.*score: cosine"):
        ClipReward(tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer, score="sigmoid")
    with pytest.raises(ConfigError, match="score 'softmax' is not one of cosine, sigmoid"):
        ClipReward(tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer, score="softmax")
