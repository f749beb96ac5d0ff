"""CLIP similarity reward on open_clip: sim(image, caption) = scale * cosine similarity, or,
for a SigLIP model, its own match probability.

Any open_clip model works: a built-in name with a pretrained tag (``ViT-L-14`` +
``openai``; ``ViT-B-16-SigLIP`` + ``webli``), ``hf-hub:org/repo``, or ``local-dir:/path`` (a
folder with ``open_clip_config.json`` and weights).

``score`` chooses the number: ``cosine`` (default; any model) or ``sigmoid``, SigLIP's own
pairwise probability sigmoid(exp(t) * cosine + b) with the model's learned logit scale t and
bias b (only models trained with the sigmoid loss have a bias; asking it of a CLIP is an
error). The cosine ranks captions exactly as the sigmoid does for one image; the sigmoid is
bounded in (0, 1) and flattens near 0 and 1, so it changes how rewards compare across images
and how far apart a group's captions score. Image embeddings are computed once per image and
reused by the K captions of that image and, through a bounded cache keyed by image id, by
later steps.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlrm import hookimpl
from vlrm.cache import EmbeddingCache
from vlrm.errors import ConfigError
from vlrm.structs import RewardOutput, Rollout


SCORES = ("cosine", "sigmoid")


class ClipReward:
    """Cosine similarity between an image and its caption under a CLIP model.

    Captions longer than the text context are truncated by the tokenizer (CLIP cannot see
    the rest); the share truncated is reported as the ``truncated`` metric.

    Args:
        model: An open_clip CLIP model.
        preprocess: Its image transform (PIL image -> tensor).
        tokenizer: Its open_clip tokenizer.
        scale: Multiplies the score.
        cache_size: Image embeddings kept between steps (0 = no cache).
        score: ``cosine``, or ``sigmoid`` (SigLIP models: see the module docstring).
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, scale: float = 1.0,
                 cache_size: int = 10_000, score: str = "cosine") -> None:
        if score not in SCORES:
            raise ConfigError(f"CLIP reward: score {score!r} is not one of {', '.join(SCORES)}")
        if score == "sigmoid" and getattr(model, "logit_bias", None) is None:
            raise ConfigError(f"CLIP reward: score 'sigmoid' needs a SigLIP model (one with a "
                              f"learned logit bias); {type(model).__name__} has none: use "
                              "score: cosine")
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.scale = scale
        self.score = score
        self._cache = EmbeddingCache(cache_size)
        for param in self.model.parameters():
            param.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    def embed_images(self, images: Sequence[Any], image_ids: Sequence[str]) -> torch.Tensor:
        """Unit-norm image embeddings. Shape: (N, D)."""
        def compute(missing: list[int]) -> torch.Tensor:
            pixels = torch.stack([self.preprocess(images[i]) for i in missing]).to(self.device)
            dtype = next(self.model.visual.parameters()).dtype
            return F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)

        return self._cache.get(image_ids, compute)

    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings. Shape: (B, D)."""
        tokens = self.tokenizer(list(captions)).to(self.device)
        return F.normalize(encode_text_trimmed(self.model, tokens).float(), dim=-1)

    def truncated(self, captions: Sequence[str]) -> torch.Tensor:
        """Shape: (B,) bool: captions whose tokens (plus start and end) overflow the context."""
        from open_clip.tokenizer import SimpleTokenizer

        if isinstance(self.tokenizer, SimpleTokenizer):
            counts = [len(self.tokenizer.encode(c)) + 2 for c in captions]
        else:  # open_clip's HFTokenizer wraps a transformers tokenizer
            counts = [len(self.tokenizer.tokenizer(c)["input_ids"]) for c in captions]
        return torch.tensor([n > self.context_length for n in counts])

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        images = self.embed_images(rollout.images, rollout.image_ids)
        texts = self.embed_texts(rollout.captions)
        sim = (texts * images[rollout.group.to(self.device)]).sum(-1)
        if self.score == "sigmoid":
            sim = torch.sigmoid(self.model.logit_scale.exp().float() * sim
                                + self.model.logit_bias.float())
        sim = sim * self.scale
        truncated = self.truncated(rollout.captions).float().mean().item()
        return RewardOutput(sequence=sim.cpu(), metrics={"truncated": truncated})


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` without the padding columns after the longest caption.

    open_clip's CLIP text tower is causal and pools at the end token, so positions after the
    last real token of every row change nothing; dropping them saves most of the text
    compute on short captions (CLIP pads every caption to 77). Other towers (bidirectional,
    or pooled elsewhere) run unchanged.

    Args:
        model: An open_clip model.
        tokens: Shape: (B, C). Token ids padded with 0 to the context length C.

    Returns:
        Shape: (B, D), unnormalised, as ``encode_text`` returns.
    """
    from open_clip.transformer import text_global_pool

    causal = getattr(model, "attn_mask", None) is not None and hasattr(model, "token_embedding")
    if not causal or getattr(model, "text_pool_type", None) not in ("argmax", "eos"):
        return model.encode_text(tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    length = int(torch.where(tokens != 0, positions, 0).amax()) + 1  # past every row's last token
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
        else x @ model.text_projection


def clip_reward(
    model_name: str = "ViT-L-14",
    pretrained: str | None = "openai",
    precision: str = "fp32",
    device: str = "cpu",
    scale: float = 1.0,
    cache_size: int = 10_000,
    score: str = "cosine",
) -> ClipReward:
    """Build a CLIP (or SigLIP) reward from open_clip's model zoo, the hub, or a local directory.

    Args:
        model_name: open_clip name (``ViT-L-14``), ``hf-hub:org/repo`` or ``local-dir:PATH``.
        pretrained: Pretrained tag or weights file; ignored with a ``hf-hub:`` or
            ``local-dir:`` name.
        precision: fp32, fp16, bf16 (open_clip precision names).
        device: Torch device.
        scale: Multiplies the score [ours: 1.0].
        cache_size: Image embeddings kept between steps.
        score: ``cosine`` [paper: CLIP similarity], or ``sigmoid`` for a SigLIP model [ours].
    """
    import open_clip

    schema = model_name.split(":", 1)[0] if ":" in model_name else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if schema else pretrained, precision=precision,
            device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"CLIP reward: cannot load open_clip model {model_name!r} (pretrained="
            f"{pretrained!r}): {exc}") from exc
    return ClipReward(model, preprocess, tokenizer, scale=scale, cache_size=cache_size, score=score)


def tiny_clip_config(
    embed_dim: int = 32, width: int = 32, layers: int = 2, image_size: int = 32,
    context_length: int = 32,
) -> dict[str, Any]:
    """An open_clip model config for a tiny ViT CLIP with the real CLIP BPE vocabulary."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                       "head_width": width // 2, "patch_size": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": 2, "layers": layers},
    }


def tiny_siglip_config(
    embed_dim: int = 32, width: int = 32, layers: int = 2, image_size: int = 32,
    context_length: int = 32,
) -> dict[str, Any]:
    """A tiny SigLIP-style open_clip config: the tiny CLIP's towers with SigLIP's text tower
    settings (bidirectional attention, last-token pooling, projection bias) and a learned
    logit bias (``init_logit_bias: -10``, as open_clip's SigLIP configs), CLIP's BPE vocabulary
    (SigLIP's own tokenizer would have to be downloaded)."""
    cfg = tiny_clip_config(embed_dim, width, layers, image_size, context_length)
    cfg["text_cfg"].update(no_causal_mask=True, pool_type="last", proj_bias=True)
    cfg["init_logit_bias"] = -10.0
    cfg["init_logit_scale"] = math.log(10.0)
    return cfg


def save_open_clip_dir(model: Any, model_cfg: dict[str, Any], path: str) -> None:
    """Write a folder that ``local-dir:PATH`` loads: config JSON and safetensors weights."""
    from safetensors.torch import save_file

    with open(f"{path}/open_clip_config.json", "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": {}}, f, indent=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, f"{path}/open_clip_model.safetensors")


def tiny_clip_reward(
    seed: int = 0, embed_dim: int = 32, width: int = 32, layers: int = 2,
    image_size: int = 32, context_length: int = 32, scale: float = 1.0,
    cache_size: int = 10_000, siglip: bool = False, score: str = "cosine",
) -> ClipReward:
    """A random-weight open_clip CLIP for tests, loaded through ``local-dir:`` like a real one.

    Args:
        seed: Seed of the random weights.
        embed_dim: Joint embedding size.
        width: Width of both towers.
        layers: Layers of both towers.
        image_size: Input resolution.
        context_length: Text context (real CLIP: 77).
        scale: Multiplies the score.
        cache_size: Image embeddings kept between steps (0 = no cache).
        siglip: A SigLIP-style model (``tiny_siglip_config``) instead of a CLIP.
        score: ``cosine`` or ``sigmoid`` (SigLIP only).
    """
    import open_clip

    make = tiny_siglip_config if siglip else tiny_clip_config
    cfg = make(embed_dim, width, layers, image_size, context_length)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_open_clip_dir(model, cfg, tmp)
        return clip_reward(f"local-dir:{tmp}", scale=scale, cache_size=cache_size, score=score)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"clip": clip_reward, "tiny_clip": tiny_clip_reward}
