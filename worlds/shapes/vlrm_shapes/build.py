"""Build the shapes world's models from scratch on a CPU, with vlrm's own model classes.

``build_world`` trains (stage 1 in a second process beside stages 2 and 3, by default):

1. the reward CLIP and the judge CLIP (open_clip ``CLIP``; different seeds and sizes, no
   shared weights; trained contrastively on true captions, 70% full and 30% partial);
2. the captioner's vision encoder (transformers ``Blip2VisionModel``), pretrained
   contrastively against a throwaway text tower and then frozen, as BLIP-2 freezes its
   contrastively pretrained EVA-CLIP ViT;
3. the captioner (``Blip2ForConditionalGeneration`` with a word-level tokenizer), trained with
   cross-entropy on the world's biased captions: it learns to name shapes and to leave
   colours and sizes out, the shortcoming VLRM's RL is meant to fix. Style conditioning
   (``train_captioner``) makes its language model follow the image prefix's style, so the
   Q-Former, all that RL trains, can steer it;
4. the ITM reward model (``vlrm_shapes.itm.build_itm``) on the captioner's frozen vision encoder.

Everything is written under ``out_dir`` in the formats the real loaders read (``local-dir:``
open_clip folders, a transformers directory), with ``build.json`` recording the settings.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlrm.errors import ConfigError
from vlrm_shapes.world import SHAPES, ShapesWorld

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)  # open_clip's OpenAI
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def word_tokenizer(world: ShapesWorld, end_token: bool = False,
                   extra_words: Sequence[str] = ()) -> Any:
    """A word-level tokenizer over the world's vocabulary, as a transformers tokenizer.

    Args:
        world: Supplies the vocabulary.
        end_token: Append ``</s>`` to every encoding (the CLIPs pool their text there).
        extra_words: More words, after the world's (whose ids do not change).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + world.vocabulary()
    vocab = {w: i for i, w in enumerate(words + [w for w in dict.fromkeys(extra_words)
                                                 if w not in words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if end_token:
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def pixels(images: Sequence[Any]) -> torch.Tensor:
    """PIL images (already 64 x 64) as normalised tensors. Shape: (N, 3, 64, 64)."""
    import numpy as np

    array = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images]))
    return (array.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def vision_features(vision: Any, images: torch.Tensor) -> torch.Tensor:
    """Frozen vision features of ``pixels`` images, 256 at a time. Shape: (N, P, H)."""
    with torch.no_grad():
        return torch.cat([vision(pixel_values=images[i:i + 256]).last_hidden_state
                          for i in range(0, len(images), 256)])


_BAR_LINE = 0  # the terminal line of this process's progress bars (the CLIP worker's: 1)


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not progress, dynamic_ncols=True,
                position=_BAR_LINE)


def _info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss of matching rows. Shapes: (B, D), (B, D), ()."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _clip_captions(world: ShapesWorld, index: int) -> str:
    # 70% full, 30% partial: the CLIPs must learn that colours and sizes matter
    return world.full_caption("train", index) if (index * 7919) % 10 < 7 else \
        world.partial_caption("train", index)


def optimise(batch_loss: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter],
              num_items: int, steps: int, batch_size: int, lr: float, weight_decay: float,
              seed: int, desc: str, progress: bool) -> dict[str, Any]:
    """AdamW with warm-up and cosine decay over random batches of item indices.

    Args:
        batch_loss: Loss of a batch, given its indices. Shape of the indices: (batch_size,).
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses, bar = [], _bar(steps, desc, progress)
    for _ in range(steps):
        loss = batch_loss(torch.randint(num_items, (batch_size,), generator=generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return {"steps": steps, "final_loss": sum(losses[-20:]) / max(1, min(20, len(losses)))}


def _train_contrastive(encode_image: Callable[[torch.Tensor], torch.Tensor],
                       encode_text: Callable[[list[str]], torch.Tensor], params: list[nn.Parameter],
                       scale: Any, world: ShapesWorld, images: torch.Tensor,
                       steps: int, batch_size: int, lr: float, seed: int, desc: str,
                       progress: bool) -> dict[str, Any]:
    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        texts = [_clip_captions(world, i) for i in idx.tolist()]
        return _info_nce(encode_image(images[idx]), encode_text(texts), scale)

    return optimise(batch_loss, params, len(images), steps, batch_size, lr, 0.05, seed, desc,
                     progress)


def train_clip(world: ShapesWorld, images: torch.Tensor, out_dir: Path, seed: int, width: int,
               layers: int, steps: int, batch_size: int = 128, lr: float = 1e-3,
               progress: bool = True, desc: str = "clip") -> dict[str, Any]:
    """Train an open_clip CLIP on the world and save it as a ``local-dir:`` folder."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    from vlrm_plugins.clip_reward import save_open_clip_dir, tiny_clip_config

    words = word_tokenizer(world, end_token=True)
    cfg = tiny_clip_config(embed_dim=width, width=width, layers=layers, image_size=64,
                           context_length=32)
    # The world's own words (about 100) instead of CLIP's 49,408 BPE tokens: the text tower
    # pools at the end token. open_clip reads the tokenizer from the model folder.
    cfg["text_cfg"].update(vocab_size=len(words), hf_tokenizer_name="shapes-words", pool_type="eos",
                           eos_id=words.eos_token_id, pad_id=words.pad_token_id)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    with tempfile.TemporaryDirectory() as tmp:
        words.save_pretrained(tmp)
        tokenizer = HFTokenizer(tmp, context_length=32)
    fit = _train_contrastive(
        model.encode_image, lambda texts: model.encode_text(tokenizer(texts)),
        list(model.parameters()), _ScaleView(model), world, images,
        steps, batch_size, lr, seed, desc, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_open_clip_dir(model.eval(), cfg, str(out_dir))
    words.save_pretrained(str(out_dir))
    return {"seed": seed, "width": width, "layers": layers, **fit}


class _ScaleView:
    """The live ``exp(logit_scale)`` of a CLIP, clamped as open_clip does (max 100)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100) * other

    __rmul__ = __mul__


class _TextTower(nn.Module):
    """Throwaway text encoder for pretraining the captioner's vision encoder."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(32, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.project = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.project(pooled)


def captioner_config(tokenizer: Any, width: int = 64, layers: int = 2, num_query_tokens: int = 8) -> Any:
    """A tiny ``Blip2Config`` for 64 x 64 images and the world's word vocabulary."""
    from transformers import Blip2Config

    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                           num_attention_heads=4, image_size=64, patch_size=8),
        qformer_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
                            encoder_hidden_size=width),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=width,
                         ffn_dim=4 * width, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=64, word_embed_proj_dim=width,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=num_query_tokens, image_token_index=image_token)


def pretrain_vision(vision: Any, tokenizer: Any, world: ShapesWorld, images: torch.Tensor, seed: int,
                    steps: int, batch_size: int = 128, lr: float = 1e-3, progress: bool = True,
                    desc: str = "vision") -> dict[str, Any]:
    """Contrastively pretrain a vision encoder (in place; e.g. ``Blip2VisionModel``,
    ``CLIPVisionModel``) against a throwaway text tower."""
    torch.manual_seed(seed)
    vision = vision.train()
    width = vision.config.hidden_size
    head = nn.Linear(width, width)
    text = _TextTower(len(tokenizer), width)
    scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def encode_image(x: torch.Tensor) -> torch.Tensor:
        return head(vision(pixel_values=x).last_hidden_state.mean(1))

    def encode_text(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        return text(enc["input_ids"], enc["attention_mask"].bool())

    params = list(vision.parameters()) + list(head.parameters()) + list(text.parameters()) + [scale]
    fit = _train_contrastive(encode_image, encode_text, params, _ParamScale(scale), world, images,
                             steps, batch_size, lr, seed, desc, progress)
    vision.eval()
    return fit


class _ParamScale(_ScaleView):
    def __init__(self, log_scale: nn.Parameter) -> None:
        self.log_scale = log_scale

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100) * other

    __rmul__ = __mul__


def caption_kinds(world: ShapesWorld, count: int) -> torch.Tensor:
    """The style of each training image's biased caption: 0 shapes, 1 meta, 2 year, 3 full."""
    return torch.tensor([world.caption_kind("train", i) for i in range(count)])


def train_captioner(policy: Any, world: ShapesWorld, features: torch.Tensor, steps: int,
                    batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                    style_dropout: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Cross-entropy on the biased captions, the vision features fixed.

    Style conditioning [ours]: on a random ``style_dropout`` share of each batch, a learned
    vector of the caption's style (shapes only, meta-prefix, year, full) is added to the
    projected queries; it is thrown away after training. The language model so learns to
    read the caption's style from its image prefix, as a pretrained LLM reads it from its
    context; without it, a tiny LM trained on coin-flip styles keeps the style in its own
    weights and the Q-Former (all RL may train) cannot steer it. The captioner itself never
    sees the style at inference: greedy captions stay as biased as the data.

    Args:
        policy: A ``Blip2OptPolicy`` whose trainable parts are everything but the vision encoder.
        features: Frozen vision features of the training images. Shape: (N, P, H).
        style_dropout: Share of captions trained with their style vector; 0 = plain CE.
    """
    if not 0.0 <= style_dropout <= 1.0:
        raise ConfigError(f"captioner style_dropout must be in [0, 1], got {style_dropout}")
    tok = policy.tokenizer
    lm = policy.model.language_model
    q = policy.num_query_tokens
    torch.manual_seed(seed)
    style = nn.Embedding(4, policy.hidden_size)
    nn.init.normal_(style.weight, 0.0, 0.5)
    kinds = caption_kinds(world, len(features))
    coin = torch.Generator().manual_seed(seed + 1)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        captions = [world.biased_caption("train", i) for i in idx.tolist()]
        ids = [tok(c, add_special_tokens=False)["input_ids"] + [policy.eos_token_id] for c in captions]
        width = max(map(len, ids))
        tokens = torch.tensor([row + [policy.pad_token_id] * (width - len(row)) for row in ids])
        mask = torch.tensor([[k < len(row) for k in range(width)] for row in ids])
        prefix = policy.prefix_embeds(features[idx])  # (B, Q + 1, H): queries, then BOS
        on = (torch.rand(len(idx), generator=coin) < style_dropout).float()[:, None, None]
        queries = prefix[:, :q] + style(kinds[idx])[:, None, :] * on
        inputs = torch.cat([queries, prefix[:, q:], lm.get_input_embeddings()(tokens)], dim=1)
        attention = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), mask.long()], dim=1)
        hidden = lm.base_model(inputs_embeds=inputs, attention_mask=attention).last_hidden_state
        hidden = hidden[:, q:q + width]  # the BOS emits the first token
        logp = torch.log_softmax(lm.get_output_embeddings()(hidden).float(), dim=-1)
        logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return -(logp * mask).sum() / mask.sum()

    params = list(policy.trainable_parameters()) + list(style.parameters())
    fit = optimise(batch_loss, params, len(features), steps, batch_size, lr, 0.01, seed,
                    "captioner", progress)
    return {**fit, "style_dropout": style_dropout}


def train_world_clips(seed: int, train_images: int, out_dir: str, reward_clip_steps: int,
                      judge_clip_steps: int, progress: bool = True, threads: int = 0,
                      bar_line: int = 0, images: torch.Tensor | None = None) -> dict[str, Any]:
    """Stage 1 of the build: the reward CLIP and the judge CLIP (different seeds and sizes).

    ``build_world`` runs it in a worker process beside the captioner's stages; there it
    renders its own copy of the training images.

    Args:
        seed: The world's seed (the CLIPs use seed + 1 and seed + 2).
        train_images: Training images rendered.
        out_dir: Receives ``reward_clip/`` and ``judge_clip/``.
        reward_clip_steps: Contrastive steps of the reward CLIP.
        judge_clip_steps: Contrastive steps of the judge CLIP.
        progress: Show progress bars.
        threads: Torch threads of this process (0 = leave as is).
        bar_line: Terminal line of the progress bars.
        images: The training images as ``pixels`` gives them; None renders them here.
    """
    global _BAR_LINE
    if threads:
        torch.set_num_threads(threads)
    _BAR_LINE = bar_line
    world = ShapesWorld(seed)
    if images is None:
        images = pixels([world.image("train", i) for i in range(train_images)])
    out = Path(out_dir)
    return {"reward_clip": train_clip(world, images, out / "reward_clip", seed + 1, width=64,
                                      layers=2, steps=reward_clip_steps, progress=progress,
                                      desc="reward clip"),
            "judge_clip": train_clip(world, images, out / "judge_clip", seed + 2, width=96,
                                     layers=3, steps=judge_clip_steps, progress=progress,
                                     desc="judge clip")}


def build_world(out_dir: str = "worlds/shapes/vlrm_shapes/weights", seed: int = 0, train_images: int = 12000,
                reward_clip_steps: int = 1500, judge_clip_steps: int = 1500,
                vision_steps: int = 2000, captioner_steps: int = 3000,
                captioner_style_dropout: float = 0.5, itm_steps: int = 1500,
                llava_vision_steps: int = 1000, llava_steps: int = 4000,
                vlm_judge_steps: int = 2000, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Train every model of the shapes world and write them to ``out_dir``.

    Args:
        out_dir: Receives ``reward_clip/``, ``judge_clip/``, ``captioner/`` and ``build.json``.
        seed: World and training seed.
        train_images: Training images rendered (from the world's train split).
        reward_clip_steps: Contrastive steps of the reward CLIP.
        judge_clip_steps: Contrastive steps of the judge CLIP.
        vision_steps: Contrastive steps of the captioner's vision encoder.
        captioner_steps: Cross-entropy steps of the captioner.
        captioner_style_dropout: Share of captions trained with a style vector (see
            ``train_captioner``).
        itm_steps: Steps of the ITM reward model (``vlrm_shapes.itm.build_itm``); 0 = none.
        llava_vision_steps: Contrastive steps of the LLaVA-style captioner's vision tower.
        llava_steps: Cross-entropy steps of the LLaVA-style captioner
            (``vlrm_shapes.llava.build_llava``); 0 = no second captioner.
        vlm_judge_steps: Steps of the VLM judge reward model, from the LLaVA-style captioner
            (``vlrm_shapes.judge_vlm.build_vlm_judge``); 0 = none.
        workers: 2 trains the two CLIPs in a second process beside the captioner's vision
            encoder and captioner, one torch thread each; 1 runs every stage in turn [ours: 2,
            for a 2-core CPU; the stages share nothing, so the models are the same either way
            up to floating-point summation order].
        progress: Show progress bars.
    """
    if train_images < 64:
        raise ConfigError(f"shapes build train_images must be >= 64, got {train_images}")
    if workers not in (1, 2):
        raise ConfigError(f"shapes build workers must be 1 or 2, got {workers}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"seed": seed, "train_images": train_images, "shapes": list(SHAPES),
                              "workers": workers}
    # 1. the two CLIPs: different seeds and sizes, nothing shared (beside stages 2-3 if workers=2)
    clip_args = (seed, train_images, str(out), reward_clip_steps, judge_clip_steps, progress)
    images = pixels([ShapesWorld(seed).image("train", i) for i in range(train_images)])
    threads = torch.get_num_threads()
    pool = clips = None
    if workers == 2:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        clips = pool.submit(train_world_clips, *clip_args, threads=1, bar_line=1)
        torch.set_num_threads(1)
    else:
        record.update(train_world_clips(*clip_args, images=images))
    try:
        _build_captioner(record, out, seed, images, vision_steps, captioner_steps,
                         captioner_style_dropout, progress)
        if clips is not None:
            record.update(clips.result())
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    record["build_seconds"] = round(time.perf_counter() - start, 1)
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    if itm_steps:  # 4. the ITM reward model, on the captioner's frozen vision encoder
        from vlrm_shapes.itm import build_itm

        held_out = min(500, train_images)
        record = build_itm(str(out), steps=itm_steps, seed=seed + 5, train_images=train_images,
                           progress=progress, eval_images=held_out, recall_images=held_out)
    if llava_steps:  # 5. the second captioner family, LLaVA-style
        from vlrm_shapes.llava import build_llava

        build_llava(str(out), vision_steps=llava_vision_steps, steps=llava_steps, seed=seed + 21,
                    style_dropout=captioner_style_dropout, train_images=train_images,
                    progress=progress)
        if vlm_judge_steps:  # 6. the VLM judge reward model, from the LLaVA-style captioner
            from vlrm_shapes.judge_vlm import build_vlm_judge

            build_vlm_judge(str(out), steps=vlm_judge_steps, seed=seed + 31,
                            train_images=train_images, eval_images=min(300, train_images // 8),
                            progress=progress)
        record = json.loads((out / "build.json").read_text())
    return record


def _build_captioner(record: dict[str, Any], out: Path, seed: int, images: torch.Tensor,
                     vision_steps: int, captioner_steps: int, style_dropout: float,
                     progress: bool) -> None:
    """Stages 2 and 3 of the build: the captioner's vision encoder, then the captioner.

    Args:
        images: The world's training images as ``pixels`` gives them.
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from vlrm_plugins.blip2_opt import Blip2OptPolicy
    from vlrm_plugins.hf_common import quiet_transformers

    world = ShapesWorld(seed)
    # 2. the captioner's vision encoder, pretrained contrastively, then frozen
    tokenizer = word_tokenizer(world)
    processor = Blip2Processor(BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer,
                               num_query_tokens=8)
    torch.manual_seed(seed + 3)
    model = Blip2ForConditionalGeneration(captioner_config(tokenizer))
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    record["vision"] = pretrain_vision(model.vision_model, tokenizer, world, images, seed + 3, vision_steps,
                                       progress=progress)
    # 3. the captioner, cross-entropy on the biased captions, the vision encoder frozen
    policy = Blip2OptPolicy(model, processor, trainable=("qformer", "query_tokens",
                                                         "language_projection", "language_model"),
                            max_new_tokens=20)
    features = vision_features(policy.model.vision_model, images)
    record["captioner"] = train_captioner(policy, world, features, captioner_steps, seed=seed + 4,
                                          style_dropout=style_dropout, progress=progress)
    with quiet_transformers():
        model.save_pretrained(str(out / "captioner"))
        processor.save_pretrained(str(out / "captioner"))


def continue_captioner(weights: str = "worlds/shapes/vlrm_shapes/weights", steps: int = 1500, lr: float = 5e-4,
                       seed: int = 12, style_dropout: float = 0.5, train_images: int = 12000,
                       progress: bool = True) -> dict[str, Any]:
    """More cross-entropy rounds for a built captioner, in place, recorded in ``build.json``.

    The vision encoder stays frozen; everything else trains, as in ``build_world``.

    Args:
        weights: A built world (a folder with ``build.json`` and ``captioner/``).
        steps: Cross-entropy steps of this round.
        lr: Peak learning rate.
        seed: Seed of the batches and the style vectors.
        style_dropout: See ``train_captioner``.
        train_images: Training images rendered (the build's first ones).
        progress: Show a progress bar.
    """
    from vlrm_plugins.blip2_opt import blip2_opt
    from vlrm_plugins.hf_common import quiet_transformers
    from vlrm_shapes.world import weights_dir

    folder = weights_dir(weights)
    record = json.loads((folder / "build.json").read_text())
    world = ShapesWorld(record["seed"])
    policy = blip2_opt(str(folder / "captioner"), trainable=(
        "qformer", "query_tokens", "language_projection", "language_model"), max_new_tokens=20)
    images = pixels([world.image("train", i) for i in range(train_images)])
    features = vision_features(policy.model.vision_model, images)
    fit = train_captioner(policy, world, features, steps, lr=lr, seed=seed,
                          style_dropout=style_dropout, progress=progress)
    with quiet_transformers():
        policy.model.save_pretrained(str(folder / "captioner"))
    record.setdefault("captioner_rounds", []).append(
        {**fit, "lr": lr, "seed": seed, "train_images": train_images})
    (folder / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
