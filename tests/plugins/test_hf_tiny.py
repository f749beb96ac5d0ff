"""Tiny random-weight captioners of nine transformers families, saved and read back.

Besides checking the builders, these tests pin down how a generic transformers policy can
sample and rescore each family (transformers 5.24, fp32, CPU): the recipes below are the ones
the policy is meant to use.
"""

import fnmatch

import numpy as np
import pytest
import torch
from torch import nn

from vlrm_plugins.hf_tiny import FAMILIES, TinySpec, build_tiny_captioner, save_tiny_captioner

K, T = 3, 8  # samples per image, new tokens

# Where each family's language model lives; LoRA targets must stay inside it.
LM_PREFIX = {
    "llava": "model.language_model.", "idefics3": "model.text_model.",
    "qwen2_vl": "model.language_model.", "paligemma": "model.language_model.",
    "gemma3": "model.language_model.", "instructblip": "language_model.",
    "blip2_t5": "language_model.", "florence2": "model.language_model.", "git": "git.encoder.",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two threads contend badly on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    """Two ordinary RGB images of different sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in ((48, 48), (64, 40))]


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(spec, model, processor) of one family, written to disk and read back with Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tmp_path_factory.mktemp(request.param)
    spec = save_tiny_captioner(request.param, path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return spec, model, AutoProcessor.from_pretrained(path)


def prompt_texts(spec: TinySpec, processor, n: int) -> list[str] | None:
    """The spec's prompt as ``text=`` for n images (None: no text)."""
    if isinstance(spec.prompt, list):
        return [processor.apply_chat_template(spec.prompt, add_generation_prompt=True,
                                              tokenize=False)] * n
    return None if spec.prompt is None else [spec.prompt] * n


def model_inputs(spec, processor, images, texts=None):
    """Processor outputs for one prompt per image.

    Images go in as one list per prompt: Gemma3Processor reads a flat list as one prompt
    with all the images; every other processor accepts both forms.
    """
    texts = prompt_texts(spec, processor, len(images)) if texts is None else texts
    kwargs = {} if texts is None else {"text": texts}
    inputs = processor(images=[[im] for im in images], return_tensors="pt", padding=True, **kwargs)
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels
    return dict(inputs)


def sample(model, inputs):
    """K samples per image, with the suppressed tokens passed explicitly.

    BLIP-2 and InstructBLIP call ``language_model.generate``, which ignores the saved
    generation config, so ``suppress_tokens`` must be passed by hand.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(
            **inputs, do_sample=True, num_return_sequences=K, max_new_tokens=T,
            output_logits=True, return_dict_in_generate=True,
            suppress_tokens=list(model.generation_config.suppress_tokens))


def repeat_samples(inputs: dict, k: int) -> dict:
    """Each image's inputs k times in a row, as ``generate(num_return_sequences=k)`` does.

    Qwen2-VL's pixel_values are a flat list of patches: they repeat per image, in chunks
    of ``image_grid_thw.prod()`` rows.
    """
    out = {}
    for key, value in inputs.items():
        if key == "pixel_values" and "image_grid_thw" in inputs:
            chunks = value.split(inputs["image_grid_thw"].prod(-1).tolist())
            out[key] = torch.cat([c for c in chunks for _ in range(k)])
        else:
            out[key] = value.repeat_interleave(k, 0)
    return out


def teacher_forced_logits(family, model, inputs, sequences, encoder_decoder):
    """Logits of the sampled tokens from one forward pass. Shape: (N*K, T, V)."""
    full = repeat_samples(inputs, K)
    if encoder_decoder:  # sequences = decoder start token + T new tokens
        return model(**full, decoder_input_ids=sequences[:, :-1]).logits
    new = sequences[:, sequences.shape[1] - T:]
    full["input_ids"] = sequences
    if "attention_mask" in full:
        full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(new)], 1)
        if family != "qwen2_vl":  # Qwen builds 3-D positions from the mask itself
            # generate() counts positions over real tokens only; InstructBLIP's query slots
            # sit before the left padding, so default positions would shift them.
            full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    for key, fill in (("token_type_ids", 1 if family == "paligemma" else 0),
                      ("mm_token_type_ids", 0)):
        # PaliGemma: new tokens are the causal suffix (1); Gemma3 / Qwen: text (0).
        if key in full:
            full[key] = torch.cat([full[key], torch.full_like(new, fill)], 1)
    return model(**full).logits[:, -(T + 1):-1]


def test_all_families_are_small_and_listed():
    assert len(FAMILIES) == 9
    for family in FAMILIES:
        model, _, spec = build_tiny_captioner(family)
        assert spec.family == family
        assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_unknown_family_and_bad_image_size_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny captioner family"):
        save_tiny_captioner("blip3", tmp_path)
    with pytest.raises(ValueError, match="multiple of 16"):
        save_tiny_captioner("llava", tmp_path, image_size=30)


def test_sampling_after_reload(saved, images):
    spec, model, processor = saved
    inputs = model_inputs(spec, processor, images)
    out = sample(model, inputs)
    n = len(images) * K
    assert out.sequences.shape[0] == n and len(out.logits) == T
    vocab = model.get_output_embeddings().out_features
    assert vocab >= len(processor.tokenizer)
    assert all(step.shape == (n, vocab) and torch.isfinite(step).all() for step in out.logits)
    if spec.encoder_decoder:  # only the decoder: its start token, then the new tokens
        assert out.sequences.shape[1] == T + 1
        assert (out.sequences[:, 0] == model.generation_config.decoder_start_token_id).all()
    elif "input_ids" in inputs:  # the prompt, then the new tokens
        prompt = inputs["input_ids"].repeat_interleave(K, 0)
        assert torch.equal(out.sequences[:, :prompt.shape[1]], prompt)
    new = out.sequences[:, -T:]
    eos = torch.tensor(model.generation_config.eos_token_id).flatten()
    ended = torch.isin(new, eos).long()
    caption = (ended.cumsum(1) - ended) == 0  # up to and including the first end token
    suppressed = torch.tensor(model.generation_config.suppress_tokens)
    assert not torch.isin(new[caption], suppressed).any()
    # Small images: every processor resizes to 32 px (Qwen: 4 x 4 patches of 8 px).
    pixels = inputs["pixel_values"]
    if "image_grid_thw" in inputs:
        assert (inputs["image_grid_thw"][:, 1:] * 8 <= 32).all()
    else:
        assert pixels.shape[-1] == pixels.shape[-2] == 32


def test_teacher_forcing_reproduces_sampling_logits(saved, images):
    spec, model, processor = saved
    texts = prompt_texts(spec, processor, 2)
    if texts is not None:  # prompts of different lengths, so that one row is padded
        texts[1] = (texts[1].replace("Describe the image.", "Describe the image in detail.")
                    if isinstance(spec.prompt, list) else
                    {"<CAPTION>": "<DETAILED_CAPTION>"}.get(spec.prompt, texts[1] + " in detail"))
        assert texts[0] != texts[1]
    inputs = model_inputs(spec, processor, images, texts)
    out = sample(model, inputs)
    with torch.no_grad():
        logits = teacher_forced_logits(spec.family, model, inputs, out.sequences,
                                       spec.encoder_decoder)
    assert (logits - torch.stack(out.logits, 1)).abs().max() < 1e-4


def test_trainable_and_lora_patterns(saved):
    spec, model, _ = saved
    params = [name for name, _ in model.named_parameters()]
    for pattern in spec.trainable:
        assert fnmatch.filter(params, pattern), pattern
    modules = dict(model.named_modules())
    for pattern in spec.lora_targets:
        names = fnmatch.filter(modules, pattern)
        assert names, pattern
        for name in names:
            assert isinstance(modules[name], nn.Linear), name
            assert name.startswith(LM_PREFIX[spec.family]), name
            assert not any(part in name for part in ("vision", "visual", "image", "qformer"))


def test_language_model_scores_text_alone(saved):
    """The reference-LM route: no image, the LM alone (a submodule for the BLIP family)."""
    spec, model, processor = saved
    tokenizer = processor.tokenizer
    text = tokenizer(["a dog on the grass", "two red cars near a tall building"],
                     return_tensors="pt", padding=True)
    with torch.no_grad():
        if spec.family == "blip2_t5":  # encoder: the empty prompt ("</s>")
            start = torch.full((2, 1), model.generation_config.decoder_start_token_id)
            logits = model.language_model(
                input_ids=tokenizer(["", ""], return_tensors="pt")["input_ids"],
                decoder_input_ids=torch.cat([start, text["input_ids"]], 1)).logits
        elif spec.family == "florence2":
            start = torch.full((2, 1), model.generation_config.decoder_start_token_id)
            logits = model(input_ids=tokenizer(["<s></s>"] * 2, return_tensors="pt",
                                               add_special_tokens=False)["input_ids"],
                           decoder_input_ids=torch.cat([start, text["input_ids"]], 1)).logits
        else:
            lm = model.language_model if spec.family == "instructblip" else model
            logits = lm(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
    assert logits.shape[:2] == (2, text["input_ids"].shape[1] + spec.encoder_decoder)
    assert torch.isfinite(logits).all()
