"""Tiny random-weight image-text-to-text captioners of real transformers classes.

``save_tiny_captioner(family, path)`` builds a model of the family's real transformers class
(65 k to 155 k parameters, random weights, built in about 0.1 s) and its real processor
class, and writes both with ``save_pretrained``, so that
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
read them back with no download. Tests of a generic transformers captioning policy use them in
place of hub checkpoints. Every tower is 2 layers of width 32; every processor resizes images
to 32 px (``image_size``) and cuts 8 px patches, so an image is 4 to 17 tokens.

Families: ``llava`` (CLIP + Llama), ``idefics3`` (Idefics3ForConditionalGeneration, the
architecture SmolVLM shares; image splitting off), ``qwen2_vl`` (Qwen2VLForConditionalGeneration),
``paligemma`` (SigLIP + Gemma), ``gemma3``, ``instructblip`` (Llama LM), ``blip2_t5`` (T5
encoder-decoder), ``florence2`` (DaViT + BART encoder-decoder) and ``git`` (GitForCausalLM).

Tokenizers are built in memory: a byte-level BPE trained (in milliseconds, deterministically)
on about 300 common English caption words, every one of which becomes a single token, plus the
special tokens each processor needs, wrapped in ``PreTrainedTokenizerFast`` (``BertTokenizer``
for GIT and InstructBLIP's Q-Former). Byte-level BPE encodes any prompt text, so chat templates
never hit an unknown token. Decoder-only tokenizers pad on the left.

Random weights give logits of standard deviation about 0.1, so sampling is close to uniform
and rarely ends early. Any token can be sampled, so each model's
``generation_config.suppress_tokens`` lists the tokens a caption must never contain: padding
and every image placeholder / image boundary token of the family (an image placeholder in a
sampled caption makes a later teacher-forced forward pass treat it as an image slot, which
crashes or mixes image features into the text). End tokens are never suppressed, even where
one doubles as padding (Qwen). BLIP-2 and InstructBLIP sample through
``language_model.generate``, which does not read the saved generation config: a policy must pass
``suppress_tokens=model.generation_config.suppress_tokens`` to ``generate`` itself (harmless for
the other families) and mask the same ids when it rescores.

Other settings chosen so that sampling and rescoring agree: dropout is 0 everywhere; Florence-2
has no ``forced_eos_token_id`` (BART's default would overwrite the last sampled token with
``</s>``); the T5 of ``blip2_t5`` has ``bos_token_id = </s>`` so that ``generate`` works
without a prompt (it feeds the encoder the queries then this "BOS"; T5 has none) and the spec
prompt ``""`` gives the same encoder input through the processor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch

FAMILIES: tuple[str, ...] = (
    "llava", "idefics3", "qwen2_vl", "paligemma", "gemma3", "instructblip", "blip2_t5",
    "florence2", "git",
)

# Common caption vocabulary: the BPE learns most of these as single tokens, so sampled
# captions of a trained-to-something model read like English and the prompts stay short.
CAPTION_WORDS = """
a an the one two three four five some many several group pair couple of on in at with and or
by near next to under over above below behind front top side inside outside around through
along across into onto from while his her their its this that there is are was were be being
has have holding sitting standing walking running riding eating playing looking lying flying
parked driving carrying wearing talking waiting sleeping smiling jumping swimming cooking
man woman men women person people boy girl child children kid baby player players crowd
dog dogs cat cats horse horses cow cows sheep bird birds elephant elephants giraffe giraffes
zebra zebras bear bears animal animals fish duck
car cars truck bus train plane airplane boat bike bicycle motorcycle street road sidewalk
traffic light sign stop parking lot city building buildings house tower bridge station
table chair couch bed room kitchen bathroom toilet sink window door wall floor desk shelf
food pizza sandwich cake plate bowl cup glass bottle banana apple orange fruit vegetables
donut hot dog coffee water wine meal breakfast dinner lunch
field grass tree trees park beach ocean sea lake river snow mountain hill sky sun clouds
water waves sand rocks flowers garden forest yard fence
ball frisbee kite skateboard surfboard skis snowboard tennis racket bat baseball soccer game
umbrella bag luggage suitcase phone laptop computer keyboard mouse screen television tv
book books clock vase scissors teddy toy shirt hat jacket dress shoes glasses tie
white black red blue green yellow brown gray grey orange pink purple colorful dark bright
large small big little old young tall long short empty full open closed wooden metal
several very close up view photo picture image shot scene background foreground
describe what does show shows showing depicts describing caption short long detailed
user assistant system question answer please you are helpful in detail this
"""

# Words of the tiny prompts and chat templates, with their casing, so prompts stay short.
PROMPT_WORDS = "USER ASSISTANT User Assistant Describe A caption en model description What"

# Special tokens of all families live in one list so token ids stay stable across families
# (id 0 = <pad>, 1 = <s>, 2 = </s>, 3 = <unk>); families that need fewer ignore the rest.
BASE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = 1024  # BPE vocabulary size before any tokens a processor adds
HIDDEN = 32  # width of every tower

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

IDEFICS3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Unlike Gemma 3's own template, no {{ bos_token }}: the tokenizer adds BOS when the
# processor tokenizes the rendered text, and a second one would double it.
GEMMA3_TEMPLATE = (
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _user_turn(text: str) -> list[dict]:
    """One user message: the image, then an instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@attrs.frozen
class TinySpec:
    """What a user of a saved tiny captioner passes to a generic policy.

    Args:
        family: One of ``FAMILIES``.
        prompt: The policy prompt: None (no text), a plain string for the processor's ``text=``
            (with the image placeholder when the processor needs one), or chat messages to
            render with ``processor.apply_chat_template(..., add_generation_prompt=True,
            tokenize=False)``.
        trainable: fnmatch patterns over ``model.named_parameters()`` names selecting the
            connector / projector a user would train.
        lora_targets: fnmatch patterns over ``model.named_modules()`` names selecting the
            language model's attention query and value ``nn.Linear`` layers.
        encoder_decoder: Whether the language model is an encoder-decoder.
    """

    family: str
    prompt: str | list[dict] | None
    trainable: tuple[str, ...]
    lora_targets: tuple[str, ...]
    encoder_decoder: bool


# ----------------------------------------------------------------------------- tokenizers


def _train_bpe(specials: list[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``CAPTION_WORDS``.

    The specials take the first ids, in order. Training is deterministic: the same call
    always gives the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = sorted(set(CAPTION_WORDS.split()) | set(PROMPT_WORDS.split()))
    # Each word once, with the leading space it has mid-sentence: 1024 ids then hold every
    # word as one token (the rest are the 256 bytes and the merges that lead to the words).
    tok.train_from_iterator([" " + w for w in words], trainer=trainer)
    return tok


def _fast_tokenizer(specials: list[str], vocab_size: int = VOCAB, **kwargs: Any) -> Any:
    """A ``PreTrainedTokenizerFast`` over a fresh BPE; ``kwargs`` name its special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe([*BASE_SPECIALS, *specials], vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _bert_tokenizer() -> Any:
    """A real ``BertTokenizer`` (uncased WordPiece) over the caption words as whole words."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(CAPTION_WORDS.split()) | set(PROMPT_WORDS.lower().split()))
    punctuation = list(".,:;!?'\"-()")
    vocab = {t: i for i, t in enumerate(specials + punctuation + words)}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def _ids(tokenizer: Any, *tokens: str) -> list[int]:
    """Ids of tokens that must exist in the vocabulary."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    missing = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise RuntimeError(f"tokens {missing} are not in the tiny vocabulary")
    return ids


# ----------------------------------------------------------------------------- small configs


def _llama(tokenizer: Any) -> dict:
    """A 2-layer Llama text config around ``tokenizer``'s special ids."""
    return dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def _vit(model_type: str, image_size: int, patch_size: int = 8, **extra: Any) -> dict:
    """A 2-layer ViT-style vision config (CLIP, SigLIP, Idefics3, BLIP families)."""
    return dict(
        model_type=model_type, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, **extra)


def _suppress(model: Any, *token_ids: int | None) -> None:
    """Record tokens a caption must never contain in the saved generation config.

    End tokens are never suppressed, even where one doubles as padding (Qwen).
    """
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ids = sorted({int(t) for t in token_ids if t is not None} - eos)
    model.generation_config.suppress_tokens = ids


# ----------------------------------------------------------------------------- families


def _build_llava(image_size: int) -> tuple[Any, Any, TinySpec]:
    """LLaVA-1.5 layout: CLIP ViT, 2-layer MLP projector, Llama; a USER/ASSISTANT template."""
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = _fast_tokenizer(["<image>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", image_token="<image>", add_bos_token=True,
                                padding_side="left")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(
        image_processor, tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    image_token = _ids(tokenizer, "<image>")[0]
    config = LlavaConfig(
        vision_config=_vit("clip_vision_model", image_size, projection_dim=HIDDEN),
        text_config=_llama(tokenizer), image_token_index=image_token,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    _suppress(model, tokenizer.pad_token_id, image_token)
    spec = TinySpec(
        "llava", _user_turn("Describe the image."), ("model.multi_modal_projector.*",),
        ("model.language_model.layers.*.self_attn.q_proj",
         "model.language_model.layers.*.self_attn.v_proj"), False)
    return model, processor, spec


def _build_idefics3(image_size: int) -> tuple[Any, Any, TinySpec]:
    """Idefics3 (SmolVLM's architecture too): SigLIP-style ViT, pixel-shuffle connector, Llama.

    Image splitting is off, so every image is one 32 px tile of ``image_seq_len`` tokens.
    """
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessor, Idefics3Processor)

    image_specials = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    tokenizer = _fast_tokenizer(image_specials, bos_token="<s>", eos_token="<end_of_utterance>",
                                unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
                                padding_side="left")
    patch, scale = 8, 2
    image_seq_len = (image_size // patch) ** 2 // scale**2
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len,
                                  chat_template=IDEFICS3_TEMPLATE)
    image_token, fake, glob = _ids(tokenizer, *image_specials[:3])
    config = Idefics3Config(
        vision_config=_vit("idefics3_vision", image_size, patch), text_config=_llama(tokenizer),
        image_token_id=image_token, scale_factor=scale, pad_token_id=tokenizer.pad_token_id)
    model = Idefics3ForConditionalGeneration(config)
    _suppress(model, tokenizer.pad_token_id, image_token, fake, glob)
    spec = TinySpec(
        "idefics3", _user_turn("Describe the image."), ("model.connector.*",),
        ("model.text_model.layers.*.self_attn.q_proj",
         "model.text_model.layers.*.self_attn.v_proj"), False)
    return model, processor, spec


def _build_qwen2_vl(image_size: int) -> tuple[Any, Any, TinySpec]:
    """Qwen2-VL: its own ViT with 2x2 patch merger, Qwen2 LM with multimodal (3-D) RoPE.

    The image processor resizes every image to about ``image_size`` squared pixels, in
    multiples of 16 (8 px patches merged 2 x 2), e.g. 32 x 32 = 4 image tokens.
    """
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"]
    # Qwen's tokenizer adds no BOS; <|endoftext|> pads, <|im_end|> ends a turn.
    tokenizer = _fast_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                unk_token=None, padding_side="left")
    patch, merge = 8, 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": image_size**2, "longest_edge": image_size**2})
    # The processor insists on a video processor even for images only.
    video_processor = Qwen2VLVideoProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": image_size**2, "longest_edge": 4 * image_size**2})
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN_TEMPLATE)
    image, video, start, end, pad = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>",
                                         "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, num_heads=2,
                           patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, bos_token_id=None,
            # As released: a turn ends at <|im_end|>, a document at <|endoftext|> (also padding).
            eos_token_id=[tokenizer.eos_token_id, pad], pad_token_id=pad,
            # head_dim 8 -> 4 rotary frequencies, split over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 1, 1]}),
        image_token_id=image, video_token_id=video, vision_start_token_id=start,
        vision_end_token_id=end)
    model = Qwen2VLForConditionalGeneration(config)
    _suppress(model, pad, image, video, start, end)
    spec = TinySpec(
        "qwen2_vl", _user_turn("Describe the image."), ("model.visual.merger.*",),
        ("model.language_model.layers.*.self_attn.q_proj",
         "model.language_model.layers.*.self_attn.v_proj"), False)
    return model, processor, spec


def _build_paligemma(image_size: int) -> tuple[Any, Any, TinySpec]:
    """PaliGemma: SigLIP ViT, linear projector, Gemma; prompt ``<image>caption en`` as released.

    The processor turns the prompt into 16 x ``<image>``, ``<s>``, ``caption en`` and a
    newline (without the ``<image>`` it guesses the same, with a warning). It also adds
    1024 ``<locXXXX>`` and 128 ``<segXXX>`` tokens to the tokenizer; the vocabulary covers
    them, so ``vocab_size == len(tokenizer)``.
    """
    from transformers import (PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessor)

    tokenizer = _fast_tokenizer(["<image>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", image_token="<image>", padding_side="left")
    patch = 8
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2
    processor = PaliGemmaProcessor(image_processor, tokenizer)
    image_token = _ids(tokenizer, "<image>")[0]
    config = PaliGemmaConfig(
        vision_config=_vit("siglip_vision_model", image_size, patch, projection_dim=HIDDEN),
        text_config=dict(
            model_type="gemma", vocab_size=len(tokenizer), hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id),
        image_token_index=image_token, projection_dim=HIDDEN, hidden_size=HIDDEN,
        pad_token_id=tokenizer.pad_token_id)
    model = PaliGemmaForConditionalGeneration(config)
    _suppress(model, tokenizer.pad_token_id, image_token)
    spec = TinySpec(
        "paligemma", "<image>caption en", ("model.multi_modal_projector.*",),
        ("model.language_model.layers.*.self_attn.q_proj",
         "model.language_model.layers.*.self_attn.v_proj"), False)
    return model, processor, spec


def _build_gemma3(image_size: int) -> tuple[Any, Any, TinySpec]:
    """Gemma 3: SigLIP ViT, pooled projector (16 patches -> 4 tokens), Gemma 3 LM.

    The user writes ``<start_of_image>``; the processor expands it to
    ``\\n\\n<start_of_image>`` + 4 x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``.
    """
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration,
                              Gemma3ImageProcessor, Gemma3Processor)

    specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>",
                "<end_of_turn>"]
    tokenizer = _fast_tokenizer(
        specials, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>",
        add_bos_token=True, padding_side="left")
    patch, tokens_per_image = 8, 4
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA3_TEMPLATE,
                                image_seq_length=tokens_per_image)
    boi, eoi, image, eot = _ids(tokenizer, "<start_of_image>", "<end_of_image>",
                                "<image_soft_token>", "<end_of_turn>")
    config = Gemma3Config(
        vision_config=_vit("siglip_vision_model", image_size, patch),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            query_pre_attn_scalar=8, max_position_embeddings=256, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot],
            pad_token_id=tokenizer.pad_token_id),
        mm_tokens_per_image=tokens_per_image, boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=image)
    model = Gemma3ForConditionalGeneration(config)
    _suppress(model, tokenizer.pad_token_id, boi, eoi, image)
    spec = TinySpec(
        "gemma3", _user_turn("Describe the image."), ("model.multi_modal_projector.*",),
        ("model.language_model.layers.*.self_attn.q_proj",
         "model.language_model.layers.*.self_attn.v_proj"), False)
    return model, processor, spec


def _qformer(vocab_size: int) -> dict:
    """A 2-layer Q-Former config (BLIP-2 / InstructBLIP)."""
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                encoder_hidden_size=HIDDEN, cross_attention_frequency=1,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _random_queries(model: Any) -> None:
    """Draw the Q-Former queries from N(0, 0.02) as BLIP-2's original code does.

    transformers initialises them to zeros (checkpoints overwrite them); zero queries make
    the Q-Former's first LayerNorm divide by ~0.
    """
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)


def _build_instructblip(image_size: int) -> tuple[Any, Any, TinySpec]:
    """InstructBLIP (Vicuna layout): ViT, instruction-aware Q-Former, Llama LM.

    The instruction goes to both the Q-Former (its own BERT tokenizer, as
    ``qformer_input_ids``) and the LM after 4 query slots.
    """
    from transformers import (BlipImageProcessor, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor)

    # No ``image_token`` attribute on the tokenizer: the BLIP processors then use their own
    # AddedToken("<image>") (with the attribute set, InstructBlipProcessor crashes).
    tokenizer = _fast_tokenizer(["<image>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", add_bos_token=True, padding_side="left")
    qformer_tokenizer = _bert_tokenizer()
    queries = 4
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer,
                                      num_query_tokens=queries)
    image_token = _ids(tokenizer, "<image>")[0]
    config = InstructBlipConfig(
        vision_config=_vit("instructblip_vision_model", image_size),
        qformer_config=_qformer(len(qformer_tokenizer)), text_config=_llama(tokenizer),
        num_query_tokens=queries, image_token_index=image_token)
    model = InstructBlipForConditionalGeneration(config)
    _random_queries(model)
    _suppress(model, tokenizer.pad_token_id, image_token)
    spec = TinySpec(
        "instructblip", "A short image description:",
        ("qformer.*", "query_tokens", "language_projection.*"),
        ("language_model.model.layers.*.self_attn.q_proj",
         "language_model.model.layers.*.self_attn.v_proj"), False)
    return model, processor, spec


def _build_blip2_t5(image_size: int) -> tuple[Any, Any, TinySpec]:
    """BLIP-2 Flan-T5 layout: ViT, Q-Former, T5 encoder-decoder; no prompt needed.

    The encoder reads the 4 projected queries (then any prompt); the decoder starts from
    ``<pad>`` (T5's decoder start token) and writes the caption.
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessor)

    # T5 ids: 0 = <pad> (also the decoder start), 1 = </s>, 2 = <unk>.
    tokenizer = _fast_tokenizer(["<image>"], eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                add_eos_token=True)
    queries = 4
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=queries)
    image_token = _ids(tokenizer, "<image>")[0]
    config = Blip2Config(
        vision_config=_vit("blip_2_vision_model", image_size), qformer_config=_qformer(64),
        text_config=dict(
            model_type="t5", vocab_size=len(tokenizer), d_model=HIDDEN, d_ff=2 * HIDDEN, d_kv=8,
            num_layers=2, num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            # T5's default init gives logits of about +-20 at this width: sampling would be
            # almost greedy. This gives logits of std ~0.1, like the other families.
            initializer_factor=0.15, dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
            # Without a prompt, generate() feeds the encoder the queries then this "BOS"
            # (T5 has none; T5Config lacks the attribute and generate() crashes). "</s>" gives
            # what BLIP-2's original code feeds for an empty prompt: queries + "</s>".
            bos_token_id=tokenizer.eos_token_id),
        num_query_tokens=queries, image_token_index=image_token)
    model = Blip2ForConditionalGeneration(config)
    _random_queries(model)
    _suppress(model, tokenizer.pad_token_id, image_token)
    spec = TinySpec(
        "blip2_t5", "", ("qformer.*", "query_tokens", "language_projection.*"),
        # Self-attention of encoder and decoder, and cross-attention (peft's T5 default).
        ("language_model.*Attention.q", "language_model.*Attention.v"), True)
    return model, processor, spec


def _build_florence2(image_size: int) -> tuple[Any, Any, TinySpec]:
    """Florence-2: DaViT vision tower, projector, BART encoder-decoder; task prompt ``<CAPTION>``.

    One DaViT stage with 8 px patches gives 4 x 4 = 16 tokens plus one pooled token.
    """
    from transformers import (CLIPImageProcessor, Florence2Config,
                              Florence2ForConditionalGeneration, Florence2Processor,
                              PreTrainedTokenizerFast)

    # BART's ids: 0 = <s>, 1 = <pad>, 2 = </s>, 3 = <unk>. No padding_side: the encoder reads
    # the prompt, so its padding side does not matter.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(["<s>", "<pad>", "</s>", "<unk>", "<image>"], VOCAB),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        image_token="<image>")
    patch = 8
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size}, do_center_crop=False)
    image_processor.image_seq_length = (image_size // patch) ** 2 + 1
    processor = Florence2Processor(image_processor, tokenizer)
    image_token = _ids(tokenizer, "<image>")[0]
    config = Florence2Config(
        text_config=dict(
            model_type="bart", vocab_size=len(tokenizer), d_model=HIDDEN, encoder_layers=2,
            decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=2 * HIDDEN, decoder_ffn_dim=2 * HIDDEN, max_position_embeddings=128,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            # BART's default forced_eos_token_id would overwrite the last sampled token with
            # </s>: a sample that is not a sample of the policy's distribution.
            forced_eos_token_id=None, forced_bos_token_id=None),
        vision_config=dict(
            depths=[1], patch_size=[patch], patch_stride=[patch], patch_padding=[0],
            patch_prenorm=[False], embed_dim=[HIDDEN], num_heads=[2], num_groups=[2],
            window_size=4, drop_path_rate=0.0, projection_dim=HIDDEN),
        image_token_id=image_token)
    model = Florence2ForConditionalGeneration(config)
    _suppress(model, tokenizer.pad_token_id, image_token)
    spec = TinySpec(
        "florence2", "<CAPTION>", ("model.multi_modal_projector.*",),
        # Self-attention of encoder and decoder, and the decoder's cross-attention.
        ("model.language_model.*_attn.q_proj", "model.language_model.*_attn.v_proj"), True)
    return model, processor, spec


def _build_git(image_size: int) -> tuple[Any, Any, TinySpec]:
    """GIT: CLIP ViT whose tokens prefix a BERT-style causal decoder; no prompt.

    Generation starts from ``[CLS]`` (GIT's BOS) and ends at ``[SEP]``.
    """
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    # Right padding (BERT's default) on purpose: GIT has absolute position embeddings, so a
    # left-padded text would shift every position.
    tokenizer = _bert_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = GitProcessor(image_processor, tokenizer)
    config = GitConfig(
        vision_config=_vit("git_vision_model", image_size), vocab_size=len(tokenizer),
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GitForCausalLM(config)
    _suppress(model, tokenizer.pad_token_id, tokenizer.cls_token_id)
    spec = TinySpec(
        "git", None, ("git.visual_projection.*",),
        ("git.encoder.layer.*.attention.self.query", "git.encoder.layer.*.attention.self.value"),
        False)
    return model, processor, spec


BUILDERS: dict[str, Callable[[int], tuple[Any, Any, TinySpec]]] = {
    "llava": _build_llava,
    "idefics3": _build_idefics3,
    "qwen2_vl": _build_qwen2_vl,
    "paligemma": _build_paligemma,
    "gemma3": _build_gemma3,
    "instructblip": _build_instructblip,
    "blip2_t5": _build_blip2_t5,
    "florence2": _build_florence2,
    "git": _build_git,
}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars or info logs while a tiny model is written."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_captioner(family: str, seed: int = 0,
                         image_size: int = 32) -> tuple[Any, Any, TinySpec]:
    """Build (model, processor, spec) of ``family`` in memory, with random weights.

    Args:
        family: One of ``FAMILIES``.
        seed: Seed of the random weights.
        image_size: Side in pixels the processor resizes images to.

    Returns:
        The model (eval mode), its processor and its ``TinySpec``.
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny captioner family {family!r}; choose from {FAMILIES}")
    if image_size <= 0 or image_size % 16:
        # 8 px patches everywhere, merged 2 x 2 by Qwen2-VL and Idefics3.
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
    torch.manual_seed(seed)
    with _quiet():
        model, processor, spec = BUILDERS[family](image_size)
    return model.eval(), processor, spec


def save_tiny_captioner(family: str, path: str | os.PathLike, seed: int = 0,
                        image_size: int = 32) -> TinySpec:
    """Build a tiny random-weight model and its real processor, and save both to ``path``.

    Args:
        family: One of ``FAMILIES``.
        path: Directory to write (created if missing).
        seed: Seed of the random weights.
        image_size: Side in pixels the processor resizes images to.

    Returns:
        The family's ``TinySpec``.
    """
    model, processor, spec = build_tiny_captioner(family, seed, image_size)
    with _quiet():
        model.save_pretrained(path)
        processor.save_pretrained(path)
    return spec
