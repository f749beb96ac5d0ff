"""QA utility: a reader answers questions about the image from the caption alone."""

import json

import pytest
import torch
from attrs import evolve

from vlrm.errors import ConfigError
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.qa_utility import JsonlQuestions, LMReader, QAUtilityReward, Question

CAPTIONS = [["a cat on a sofa", "a red bus"], ["a rocket"], ["coffee", "two cups"]]


def _questions_file(tmp_path, records):
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def questions(tmp_path):
    q = [{"question": "What is in the picture?", "choices": ["an animal", "a vehicle", "a drink"],
          "answer": 0},
         {"question": "Is it indoors?", "choices": ["yes", "no"], "answer": "yes"}]
    return JsonlQuestions(str(_questions_file(tmp_path, [
        {"image_id": f"image-{i}", "questions": q} for i in range(3)])))


@pytest.fixture(scope="module")
def reader():
    """A random-weight OPT with the real GPT-2 BPE tokenizer, built in-process."""
    from transformers import OPTConfig, OPTForCausalLM

    from vlrm_plugins.blip2_opt import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return LMReader(OPTForCausalLM(config), tokenizer, batch_size=3)


def test_the_reward_is_the_share_the_lm_reader_answers_right(questions, reader, photos):
    rollout = make_rollout(CAPTIONS, images=[img for _, img in photos[:3]])
    out = check_reward(QAUtilityReward(questions, reader), rollout)
    asked = questions.questions("image-0")
    for b, caption in enumerate(rollout.captions):
        answers = reader.answer(caption, asked)
        right = sum(a == q.answer for a, q in zip(answers, asked)) / len(asked)
        assert out.sequence[b].item() == pytest.approx(right)
    assert out.metrics["answered"] == 1.0  # an LM reader always picks a letter


def test_the_lm_reader_picks_the_letter_the_model_scores_highest_after_the_prompt(reader):
    q = Question("What colour is it?", ("red", "green", "blue", "gold"), 2)
    prompt = reader.prompt("a small blue square", q)
    assert prompt.endswith("C. blue\nD. gold\nAnswer:")
    ids = reader.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = reader.model(**ids).logits[0, -1]  # one prompt alone, no padding
    letters = reader.letter_ids(4)
    assert reader.answer("a small blue square", [q]) == [int(logits[letters].argmax())]
    # batched with longer prompts (left padding), the same logits
    other = Question("And its shape, described at some length?", ("square", "circle"), 0)
    batched = reader.letter_logits([prompt, reader.prompt("x " * 20, other)])
    torch.testing.assert_close(batched[0], logits, atol=1e-4, rtol=1e-4)


def test_bad_question_files_are_errors_naming_the_file_and_line(tmp_path):
    bad = _questions_file(tmp_path, [{"image_id": "a", "questions": [
        {"question": "q", "choices": ["x", "y"], "answer": 0}]}])
    with bad.open("a") as f:
        f.write('{"image_id": "b", "questions": [{"question": "q"}]}\n')
    with pytest.raises(ConfigError, match=r"questions.jsonl:2: not a question record"):
        JsonlQuestions(str(bad))
    wrong = _questions_file(tmp_path, [{"image_id": "a", "questions": [
        {"question": "q", "choices": ["x", "y"], "answer": "z"}]}])
    with pytest.raises(ConfigError, match=r"questions.jsonl:1: answer 'z' is not one of the 2"):
        JsonlQuestions(str(wrong))
    good = JsonlQuestions(str(_questions_file(tmp_path, [{"image_id": "a", "questions": [
        {"question": "q", "choices": ["x", "y"], "answer": "y"}]}])))
    assert good.questions("a")[0].answer == 1
    with pytest.raises(ConfigError, match="has no questions for image 'b'"):
        good.questions("b")
    with pytest.raises(ConfigError, match="does not exist"):
        JsonlQuestions(str(tmp_path / "missing.jsonl"))


def test_shapes_world_questions_and_grammar_reader():
    from vlrm_shapes.qa import ShapesQuestions, ShapesReader, shapes_qa_utility
    from vlrm_shapes.world import ShapesWorld, image_id

    world, source, reader = ShapesWorld(0), ShapesQuestions(0), ShapesReader()
    index = next(i for i in range(50) if len(world.scene("test", i)) == 3)
    asked = source.questions(image_id("test", index))
    assert len(asked) == 1 + 3 * 3
    full = world.full_caption("test", index)

    def share(caption):
        return sum(a == q.answer for a, q in zip(reader.answer(caption, asked), asked)) / len(asked)

    assert share(full) == 1.0  # every object with its shape, colour and size, left to right
    scene = world.scene("test", index)
    shapes_only = " and ".join(f"a {t.shape}" for t in scene)  # what the biased captioner says
    assert share(shapes_only) == pytest.approx(4 / 10)
    assert share("a dog on a beach") == 0.0 and reader.answer("", asked) == [-1] * 10
    wrong = " and ".join(f"a {t.size} {'red' if t.colour != 'red' else 'blue'} {t.shape}"
                         for t in scene)
    assert share(wrong) == pytest.approx(7 / 10)  # every colour wrong
    # as a reward: the images' own ids, check_reward's contract, the share per caption
    ids = [image_id("test", index), image_id("test", index + 1)]
    rollout = make_rollout([[full, shapes_only], ["a red circle"]],
                           images=[world.image("test", index), world.image("test", index + 1)])
    rollout = evolve(rollout, image_ids=ids)
    out = check_reward(shapes_qa_utility(0), rollout)
    assert out.sequence[:2].tolist() == pytest.approx([1.0, 0.4])
    assert out.metrics["answered"] < 1.0  # the shapes-only caption leaves colours and sizes out


def test_shapes_questions_charge_each_invented_object():
    from vlrm_shapes.qa import ShapesQuestions, ShapesReader
    from vlrm_shapes.world import ShapesWorld, image_id

    world, reader = ShapesWorld(0), ShapesReader()
    index = next(i for i in range(50) if len(world.scene("test", i)) == 1)
    asked = ShapesQuestions(0).questions(image_id("test", index))
    # the count, the one object's shape, colour and size, and the two empty positions' shapes
    assert len(asked) == 1 + 3 + 2
    assert [q.choices[q.answer] for q in asked[-2:]] == ["none", "none"]
    assert len(ShapesQuestions(0, ask_absent=False).questions(image_id("test", index))) == 4

    def right(caption):
        return sum(a == q.answer for a, q in zip(reader.answer(caption, asked), asked))

    full = world.full_caption("test", index)
    assert right(full) == 6
    # one invented object costs the count and the second position; two cost a third question
    assert right(f"{full} and a small red circle") == 4
    assert right(f"{full} and a small red circle and a large blue square") == 3


def test_both_rewards_are_registered_for_configs():
    from vlrm.plugins import get_registry

    rewards = get_registry().components["rewards"]
    assert rewards["qa_utility"].factory.__module__ == "vlrm_plugins.qa_utility"
    assert rewards["shapes_qa_utility"].plugin == "shapes_qa"  # the world's own entry point
