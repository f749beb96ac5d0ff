import pytest
import torch
import torch.nn.functional as F

from vlrm.evaluation import CaptionSet
from vlrm_plugins.clip_eval import ClipScore, tiny_clip_recall, tiny_clip_score

CAPTIONS = ["a man in a space suit", "a cat lying down", "a cup of coffee", "a rocket on a pad",
            "a galaxy of stars", "a red motorcycle"]


@pytest.fixture(scope="module")
def caption_set(photos):
    images = dict(photos)
    ids = list(images)[:len(CAPTIONS)]
    refs = [[c, "something else entirely"] for c in CAPTIONS[:len(ids)]]
    return CaptionSet(image_ids=ids, captions=CAPTIONS[:len(ids)], load_image=images.__getitem__,
                      references=refs)


def direct_embeddings(clip, caption_set, texts):
    """The CLIP called directly through open_clip, no vlrm code in between."""
    model = clip.model
    pixels = torch.stack([clip.preprocess(caption_set.load_image(i)) for i in caption_set.image_ids])
    with torch.no_grad():
        images = F.normalize(model.encode_image(pixels), dim=-1)
        texts = F.normalize(model.encode_text(clip.tokenizer(texts)), dim=-1)
    return images, texts


def test_clip_recall_matches_a_direct_ranking(caption_set):
    evaluator = tiny_clip_recall(seed=3, ks=(1, 2, 5))
    out = evaluator(caption_set)
    images, texts = direct_embeddings(evaluator.clip, caption_set, list(caption_set.captions))
    sim = texts @ images.T
    order = sim.argsort(dim=1, descending=True)
    ranks = torch.tensor([(order[i] == i).nonzero().item() + 1 for i in range(len(sim))]).double()
    assert out["r1"] == pytest.approx((ranks <= 1).double().mean().item())
    assert out["r2"] == pytest.approx((ranks <= 2).double().mean().item())
    assert out["mrr"] == pytest.approx((1 / ranks).mean().item(), abs=1e-6)
    assert out["mean_rank"] == pytest.approx(ranks.mean().item())
    assert out["num_images"] == len(caption_set)
    # the protocol is recorded with the result
    assert out["backbone"] == "tiny-clip(seed=3)" and out["precision"] == "fp32"
    assert out["context_length"] == 32 and out["truncated"] == 0.0


def test_clip_recall_counts_truncated_captions(caption_set):
    long = CaptionSet(image_ids=caption_set.image_ids,
                      captions=["word " * 40] + list(caption_set.captions[1:]),
                      load_image=caption_set.load_image)
    out = tiny_clip_recall(seed=3)(long)
    assert out["truncated"] == pytest.approx(1 / len(long))


def test_clip_score_and_ref_clip_score_by_hand(caption_set):
    evaluator = tiny_clip_score(seed=3)
    assert evaluator.w == 2.5 and evaluator.prefix == "A photo depicts"   # Hessel et al.
    out = evaluator(caption_set)
    prefixed = [f"A photo depicts {c}" for c in caption_set.captions]
    images, texts = direct_embeddings(evaluator.clip, caption_set, prefixed)
    clip_s = 2.5 * (images * texts).sum(-1).clamp(min=0)
    assert out["clip_s"] == pytest.approx(clip_s.mean().item(), abs=1e-5)
    refs = [[f"A photo depicts {r}" for r in rs] for rs in caption_set.references]
    best = []
    for i, rs in enumerate(refs):
        _, ref_emb = direct_embeddings(evaluator.clip, caption_set, rs)
        best.append(max((ref_emb @ texts[i]).max().item(), 0.0))
    best = torch.tensor(best)
    # the candidate is itself one of its references: the text side is 1
    assert torch.allclose(best, torch.ones_like(best), atol=1e-5)
    harmonic = 2 * clip_s * best / (clip_s + best)
    assert out["ref_clip_s"] == pytest.approx(harmonic.mean().item(), abs=1e-5)


def test_clip_score_without_references_has_no_ref_score(caption_set):
    plain = CaptionSet(image_ids=caption_set.image_ids, captions=caption_set.captions,
                       load_image=caption_set.load_image)
    evaluator = ClipScore(tiny_clip_score(seed=3).clip, "tiny", w=1.0, prefix="")
    out = evaluator(plain)
    assert "ref_clip_s" not in out and out["w"] == 1.0 and out["prefix"] == ""


def test_evaluators_are_registered():
    from vlrm.plugins import get_registry

    evaluators = get_registry().components["evaluators"]
    assert {"clip_recall", "clip_score", "tiny_clip_recall", "caption_stats"} <= set(evaluators)
    assert evaluators["clip_recall"].path == "vlrm_plugins.clip_eval.clip_recall"
