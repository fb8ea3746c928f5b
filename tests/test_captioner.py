"""The captioner with a tiny random-weight LLaVA loaded from disk like a hub model."""

from __future__ import annotations

import pytest
import torch

from captioner.checks import check_caption, cut_unfinished_sentence, repeated_ngram_share
from captioner.errors import ModelNotAvailableError
from captioner.generation import Captioner, CaptionRequest
from captioner.loading import load_model
from captioner.prompts import PRESETS, Prompt
from schemas.caption_config import GenerationSettings, ModelSettings
from tests import image_factory as mk

ALT_TEXTS = [
    None,
    "a cat on a red sofa",
    "coffee",
    None,
    "a rocket rises from the launch pad with smoke and fire",
    "moon",
]


@pytest.fixture(scope="session")
def tiny_llava(tiny_llava_dir):
    return load_model(ModelSettings(model=str(tiny_llava_dir)))


def requests() -> list[CaptionRequest]:
    sizes = [(300, 200), (200, 300), (256, 256), (400, 120), (120, 90), (640, 480)]
    return [
        CaptionRequest(f"k{i}", mk.jpeg_bytes(mk.photo_image(size)), alt)
        for i, (size, alt) in enumerate(zip(sizes, ALT_TEXTS, strict=True))
    ]


def caption_all(loaded, **settings) -> dict[str, object]:
    captioner = Captioner(loaded, GenerationSettings(**settings))
    return {r.key: r for r in captioner.caption(requests())}


def test_loads_through_the_hub_code_path(tiny_llava, tiny_llava_dir):
    assert type(tiny_llava.model).__name__ == "LlavaForConditionalGeneration"
    assert tiny_llava.revision == "local"
    assert tiny_llava.dtype == torch.float32 and tiny_llava.device.type == "cpu"
    assert (tiny_llava_dir / "model.safetensors").is_file()


def test_batched_greedy_equals_one_at_a_time(tiny_llava):
    captioner = Captioner(tiny_llava, GenerationSettings(prompt="pixart-alt", batch_size=6, max_new_tokens=24))
    prepared = captioner.prepare(requests())
    assert (prepared.inputs["attention_mask"] == 0).any(), "prompts of different lengths must be padded"
    assert (prepared.inputs["attention_mask"][:, -1] == 1).all(), "padding must be on the left"
    batched = caption_all(tiny_llava, prompt="pixart-alt", batch_size=6, max_new_tokens=24)
    single = caption_all(tiny_llava, prompt="pixart-alt", batch_size=1, max_new_tokens=24)
    assert list(batched) == list(single)
    for key in single:
        assert batched[key].raw_caption == single[key].raw_caption
        assert batched[key].num_tokens == single[key].num_tokens


def test_alt_text_prompts_get_their_own_alt_text(tiny_llava):
    captioner = Captioner(tiny_llava, GenerationSettings(prompt="pixart-alt", batch_size=6))
    prepared = captioner.prepare(requests())
    tokenizer = tiny_llava.processor.tokenizer
    for alt, (prompt_id, prompt), ids in zip(ALT_TEXTS, prepared.prompts, prepared.inputs["input_ids"], strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if alt is None:
            assert (prompt_id, prompt) == ("pixart", PRESETS["pixart"])
        else:
            assert prompt_id == "pixart-alt" and f'"{alt}"' in prompt
            assert alt in text  # reached the model's input, not just the prompt string


def test_prompt_presets_and_free_text():
    assert Prompt.parse("pixart").render("ignored") == ("pixart", PRESETS["pixart"])
    custom = Prompt.parse("List the objects in this photo of {alt_text}.")
    prompt_id, text = custom.render("a kitchen")
    assert prompt_id.startswith("custom-") and text == "List the objects in this photo of a kitchen."
    assert custom.render("  ")[0] == "pixart"


def test_every_request_gets_one_result_and_bad_images_say_why(tiny_llava):
    captioner = Captioner(tiny_llava, GenerationSettings(batch_size=4, max_new_tokens=8))
    reqs = [*requests(), CaptionRequest("broken", b"not a jpeg")]
    results = {r.key: r for r in captioner.caption(reqs)}
    assert sorted(results) == sorted(r.key for r in reqs)
    assert results["broken"].status == "error" and results["broken"].error.startswith("image_error")
    ok = results["k0"]
    assert ok.status == "ok" and ok.finish_reason in ("eos", "length") and 0 < ok.num_tokens <= 8


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_llava):
    results = caption_all(tiny_llava, batch_size=3, max_new_tokens=12, ignore_eos=True)
    assert {r.num_tokens for r in results.values()} == {12}
    assert {r.finish_reason for r in results.values()} == {"length"}


def test_sampling_is_reproducible_from_the_seed(tiny_llava):
    a = caption_all(tiny_llava, batch_size=3, max_new_tokens=16, temperature=0.7, seed=3)
    b = caption_all(tiny_llava, batch_size=3, max_new_tokens=16, temperature=0.7, seed=3)
    c = caption_all(tiny_llava, batch_size=3, max_new_tokens=16, temperature=0.7, seed=4)
    assert [r.raw_caption for r in a.values()] == [r.raw_caption for r in b.values()]
    assert [r.raw_caption for r in a.values()] != [r.raw_caption for r in c.values()]


def test_out_of_memory_halves_the_batch_and_retries(tiny_llava, monkeypatch):
    reference = caption_all(tiny_llava, batch_size=1, max_new_tokens=10)
    captioner = Captioner(tiny_llava, GenerationSettings(batch_size=6, max_new_tokens=10))
    real_generate = tiny_llava.model.generate
    sizes = []

    def generate_with_small_memory(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_generate(**kwargs)

    monkeypatch.setattr(tiny_llava.model, "generate", generate_with_small_memory)
    results = {r.key: r for r in captioner.caption(requests())}
    assert sizes[:3] == [6, 3, 1] and captioner.batch_size == 1  # 6 -> 3 -> 1 (halved, rounded down)
    assert sorted(results) == sorted(reference)
    assert all(results[k].raw_caption == reference[k].raw_caption for k in reference)


def test_missing_model_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(ModelSettings(model="llava-hf/no-such-model-7b-hf"))
    message = str(info.value)
    assert "'llava-hf/no-such-model-7b-hf'" in message and "hf download" in message
    assert message.count(". ") == 0 and message.endswith(".")


class TestChecks:
    def test_truncated_caption_loses_its_unfinished_sentence(self):
        checked = check_caption("A red car on a street. Two people walk by the", "length")
        assert checked.truncated and checked.text == "A red car on a street."
        assert checked.cut_text == "Two people walk by the"

    def test_finished_caption_is_kept_whole(self):
        checked = check_caption("A red car. Two people walk by the", "eos")
        assert not checked.truncated and checked.text == "A red car. Two people walk by the"

    def test_truncated_without_a_full_sentence_is_kept(self):
        assert cut_unfinished_sentence("a red car on a street with") == ("a red car on a street with", None)

    def test_repetition_loop_is_flagged(self):
        loop = "The image shows a cat. " + "The cat is on the sofa. " * 8
        checked = check_caption(loop, "eos")
        assert checked.repetitive and checked.repetition > 0.5
        dense = "A tabby cat sleeps on a red velvet sofa beside a window with white lace curtains."
        assert repeated_ngram_share(dense, 3) == 0.0
        assert not check_caption(dense, "eos").repetitive

    def test_empty_output_is_flagged(self):
        checked = check_caption("   ", "eos")
        assert checked.empty and checked.text == ""
