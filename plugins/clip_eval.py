"""CLIP-based evaluators: CLIP Recall (the paper's headline metric) and CLIPScore.

``ClipRecall`` follows the protocol VLRM took from IC3: embed the N test images and their N
generated captions with a CLIP, rank all N images for each caption by cosine similarity,
and report R@1/5/10, MRR and mean/median rank. Ties count against the true image. IC3 used
open_clip ViT-g-14 (laion2b_s12b_b42k); the backbone, tag, precision, text context length
and the share of captions CLIP had to truncate are recorded with every result.

``ClipScore`` is Hessel et al.'s reference-free CLIP-S, w * max(cos(image, "A photo depicts "
+ caption), 0) with w = 2.5 on ViT-B/32 (openai), and, when the data has references,
RefCLIP-S, the harmonic mean of CLIP-S and max(max_r cos(caption, reference), 0). Those
defaults are the reference protocol; change them and the numbers are no longer comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlrm import hookimpl
from vlrm.evaluation import CaptionSet, Metric
from vlrm.retrieval import retrieval_metrics, true_ranks
from vlrm_plugins.clip_reward import ClipReward, clip_reward, tiny_clip_reward


class _ClipEvaluator:
    """Shared part: a CLIP (from the reward plugin's loader) plus what to record about it."""

    def __init__(self, clip: ClipReward, backbone: str, pretrained: str | None,
                 precision: str, batch_size: int = 64) -> None:
        self.clip = clip
        self.batch_size = batch_size
        self.protocol: dict[str, Metric] = {
            "backbone": backbone, "pretrained": str(pretrained), "precision": precision,
            "context_length": clip.context_length}

    def image_embeddings(self, captions: CaptionSet) -> torch.Tensor:
        """Shape: (N, D), unit norm."""
        parts = [self.clip.embed_images(images, ids)
                 for ids, images in captions.image_batches(self.batch_size)]
        return torch.cat(parts)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Shape: (B, D), unit norm."""
        parts = [self.clip.embed_texts(texts[i:i + self.batch_size])
                 for i in range(0, len(texts), self.batch_size)]
        return torch.cat(parts)

    def truncated_share(self, texts: list[str]) -> float:
        return self.clip.truncated(texts).float().mean().item()


class ClipRecall(_ClipEvaluator):
    """Caption -> image retrieval among the evaluated images: R@k, MRR, mean/median rank.

    Args:
        clip: The CLIP that embeds images and captions.
        backbone: Its name, recorded with the result.
        pretrained: Its pretrained tag, recorded with the result.
        precision: Its precision, recorded with the result.
        ks: The k of each R@k [paper: 1, 5, 10].
        batch_size: Images or captions per CLIP call.
    """

    def __init__(self, clip: ClipReward, backbone: str, pretrained: str | None = None,
                 precision: str = "fp32", ks: tuple[int, ...] = (1, 5, 10),
                 batch_size: int = 64) -> None:
        super().__init__(clip, backbone, pretrained, precision, batch_size)
        self.ks = tuple(ks)

    @torch.no_grad()
    def __call__(self, captions: CaptionSet) -> Mapping[str, Metric]:
        images = self.image_embeddings(captions)
        texts = self.text_embeddings(list(captions.captions))
        sim = texts @ images.T  # (N captions, N images)
        out: dict[str, Metric] = dict(retrieval_metrics(true_ranks(sim), self.ks))
        out["num_images"] = len(captions)
        out["truncated"] = self.truncated_share(list(captions.captions))
        out.update(self.protocol)
        return out


class ClipScore(_ClipEvaluator):
    """CLIP-S and, with references, RefCLIP-S (Hessel et al., 2021).

    Args:
        clip: The CLIP that embeds images and captions.
        backbone: Its name, recorded with the result.
        pretrained: Its pretrained tag, recorded with the result.
        precision: Its precision, recorded with the result.
        w: Rescaling weight [Hessel et al.: 2.5].
        prefix: Prepended to every caption and reference [Hessel et al.: "A photo depicts"].
        batch_size: Images or captions per CLIP call.
    """

    def __init__(self, clip: ClipReward, backbone: str, pretrained: str | None = None,
                 precision: str = "fp32", w: float = 2.5, prefix: str = "A photo depicts",
                 batch_size: int = 64) -> None:
        super().__init__(clip, backbone, pretrained, precision, batch_size)
        self.w, self.prefix = w, prefix
        self.protocol.update(w=w, prefix=prefix)

    def _with_prefix(self, texts: list[str]) -> list[str]:
        return [f"{self.prefix} {t}".strip() if self.prefix else t for t in texts]

    @torch.no_grad()
    def __call__(self, captions: CaptionSet) -> Mapping[str, Metric]:
        images = self.image_embeddings(captions)
        texts = self.text_embeddings(self._with_prefix(list(captions.captions)))
        clip_s = self.w * (texts * images).sum(-1).clamp(min=0)  # (N,)
        out: dict[str, Metric] = {"clip_s": clip_s.mean().item()}
        if captions.references is not None:
            flat = [r for refs in captions.references for r in refs]
            owner = torch.tensor([i for i, refs in enumerate(captions.references) for _ in refs])
            if flat:
                refs = self.text_embeddings(self._with_prefix(flat))
                cos = (refs * texts[owner]).sum(-1)  # (R,)
                best = torch.full((len(captions),), -1.0).scatter_reduce(0, owner, cos, "amax")
                ref_s = best.clamp(min=0)
                ref_clip_s = 2 * clip_s * ref_s / (clip_s + ref_s).clamp(min=1e-12)
                out["ref_clip_s"] = ref_clip_s.mean().item()
        out["truncated"] = self.truncated_share(self._with_prefix(list(captions.captions)))
        out.update(self.protocol)
        return out


def clip_recall(model_name: str = "ViT-g-14", pretrained: str | None = "laion2b_s12b_b42k",
                precision: str = "fp32", device: str = "cpu", ks: tuple[int, ...] = (1, 5, 10),
                batch_size: int = 64) -> ClipRecall:
    """CLIP Recall with an open_clip model [IC3's protocol: ViT-g-14, laion2b_s12b_b42k].

    Args:
        model_name: open_clip name, ``hf-hub:org/repo`` or ``local-dir:PATH``.
        pretrained: Pretrained tag (ignored for hf-hub: and local-dir: names).
        precision: fp32, fp16 or bf16.
        device: Torch device.
        ks: The k of each R@k.
        batch_size: Images or captions per CLIP call.
    """
    clip = clip_reward(model_name, pretrained, precision=precision, device=device)
    return ClipRecall(clip, model_name, pretrained, precision, ks, batch_size)


def clip_score(model_name: str = "ViT-B-32", pretrained: str | None = "openai",
               precision: str = "fp32", device: str = "cpu", w: float = 2.5,
               prefix: str = "A photo depicts", batch_size: int = 64) -> ClipScore:
    """CLIPScore / RefCLIPScore [Hessel et al.: ViT-B/32 openai, w = 2.5, "A photo depicts"].

    Args:
        model_name: open_clip name, ``hf-hub:org/repo`` or ``local-dir:PATH``.
        pretrained: Pretrained tag.
        precision: fp32, fp16 or bf16 (the reference numbers used fp16 on a GPU).
        device: Torch device.
        w: Rescaling weight.
        prefix: Prepended to captions and references.
        batch_size: Images or captions per CLIP call.
    """
    clip = clip_reward(model_name, pretrained, precision=precision, device=device)
    return ClipScore(clip, model_name, pretrained, precision, w, prefix, batch_size)


def tiny_clip_recall(seed: int = 7, ks: tuple[int, ...] = (1, 5, 10)) -> ClipRecall:
    """CLIP Recall with a tiny random-weight open_clip CLIP (tests and demos)."""
    return ClipRecall(tiny_clip_reward(seed=seed), f"tiny-clip(seed={seed})", None, "fp32", ks)


def tiny_clip_score(seed: int = 7) -> ClipScore:
    """CLIPScore with a tiny random-weight open_clip CLIP (tests and demos)."""
    return ClipScore(tiny_clip_reward(seed=seed), f"tiny-clip(seed={seed})", None, "fp32")


@hookimpl
def vlrm_register_evaluators() -> dict[str, Any]:
    return {"clip_recall": clip_recall, "clip_score": clip_score,
            "tiny_clip_recall": tiny_clip_recall, "tiny_clip_score": tiny_clip_score}
