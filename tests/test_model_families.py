"""Every caption model family through the transformers engine: tiny random-weight LLaVA, Qwen2-VL and Idefics3
(SmolVLM) folders saved like hub models, and the image pixel cap that keeps Qwen2-VL's dynamic resolution in check."""

from __future__ import annotations

import math

import pytest

from captioner.generation import Captioner, CaptionRequest, image_pixel_cap, open_image
from captioner.loading import LoadedModel, load_model
from schemas.caption_config import CaptionConfig, GenerationSettings, ModelSettings
from tests import image_factory as mk

ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}
SIZES = [(300, 200), (200, 300), (256, 256), (400, 120), (120, 90), (640, 480)]
ALT_TEXTS = [None, "a cat on a red sofa", "coffee", None, "a rocket rises from the launch pad", "moon"]
QWEN_DEFAULT_CAP = 576 * 28 * 28


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def family(request) -> tuple[str, LoadedModel]:
    """Each family's tiny folder, loaded as a hub id is loaded."""
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    return request.param, load_model(ModelSettings(model=str(folder)))


def requests() -> list[CaptionRequest]:
    return [
        CaptionRequest(f"k{i}", mk.jpeg_bytes(mk.photo_image(size)), alt)
        for i, (size, alt) in enumerate(zip(SIZES, ALT_TEXTS, strict=True))
    ]


def caption_all(loaded: LoadedModel, **settings) -> dict[str, object]:
    return {r.key: r for r in Captioner(loaded, GenerationSettings(**settings)).caption(requests())}


def image_tokens(loaded: LoadedModel, size: tuple[int, int]) -> int:
    """How many image placeholder tokens the processor puts in the prompt of one image of ``size``."""
    captioner = Captioner(loaded, GenerationSettings())
    prepared = captioner.prepare([CaptionRequest("k", mk.jpeg_bytes(mk.photo_image(size)))])
    image_token_id = loaded.model.config.image_token_id
    return int((prepared.inputs["input_ids"] == image_token_id).sum())


def test_loads_through_the_hub_code_path(family):
    name, loaded = family
    assert type(loaded.model).__name__ == ARCHITECTURES[name]
    assert loaded.model.config.architectures == [ARCHITECTURES[name]]
    assert loaded.revision == "local" and loaded.processor.tokenizer.padding_side == "left"
    tokenizer = loaded.processor.tokenizer
    eos = loaded.model.generation_config.eos_token_id
    assert Captioner(loaded, GenerationSettings()).eos_ids == (set(eos) if isinstance(eos, list) else {eos})
    if name == "qwen2_vl":  # every EOS of the generation config counts, not only the tokenizer's
        assert Captioner(loaded, GenerationSettings()).eos_ids == set(
            tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        )
    assert loaded.model.config.image_token_id == tokenizer.convert_tokens_to_ids(
        {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "idefics3": "<image>"}[name]
    )


def test_batched_greedy_equals_one_at_a_time(family):
    _, loaded = family
    captioner = Captioner(loaded, GenerationSettings(prompt="pixart-alt", batch_size=6, max_new_tokens=16))
    prepared = captioner.prepare(requests())
    assert (prepared.inputs["attention_mask"] == 0).any(), "prompts of different lengths must be padded"
    assert (prepared.inputs["attention_mask"][:, -1] == 1).all(), "padding must be on the left"
    batched = caption_all(loaded, prompt="pixart-alt", batch_size=6, max_new_tokens=16)
    single = caption_all(loaded, prompt="pixart-alt", batch_size=1, max_new_tokens=16)
    assert list(batched) == list(single)
    for key in single:
        assert batched[key].status == "ok" and batched[key].num_tokens > 0
        assert (batched[key].raw_caption, batched[key].num_tokens) == (single[key].raw_caption, single[key].num_tokens)


def test_every_request_gets_one_result_and_bad_images_say_why(family):
    _, loaded = family
    reqs = [*requests()[:3], CaptionRequest("broken", b"not a jpeg"), CaptionRequest("cut", mk.truncated_jpeg())]
    results = {r.key: r for r in Captioner(loaded, GenerationSettings(batch_size=2, max_new_tokens=6)).caption(reqs)}
    assert sorted(results) == sorted(r.key for r in reqs)
    for bad in ("broken", "cut"):
        assert results[bad].status == "error" and results[bad].error.startswith("image_error: ")
    ok = [results[k] for k in ("k0", "k1", "k2")]
    assert all(r.status == "ok" and r.finish_reason in ("eos", "length") and 0 < r.num_tokens <= 6 for r in ok)


def test_the_family_default_pixel_cap():
    assert image_pixel_cap(None, "qwen2_vl") == image_pixel_cap(None, "qwen2_5_vl") == QWEN_DEFAULT_CAP == 451_584
    assert image_pixel_cap(None, "llava") is None and image_pixel_cap(None, "idefics3") is None
    assert image_pixel_cap(50_000, "qwen2_vl") == 50_000 and image_pixel_cap(50_000, "llava") == 50_000


def test_open_image_downscales_larger_images_and_keeps_the_aspect():
    big = CaptionRequest("big", mk.jpeg_bytes(mk.photo_image((1600, 1200))))
    capped = open_image(big, QWEN_DEFAULT_CAP)
    assert capped.width * capped.height <= QWEN_DEFAULT_CAP
    assert capped.width * capped.height > 0.99 * QWEN_DEFAULT_CAP  # downscaled to the cap, not below it
    assert math.isclose(capped.width / capped.height, 1600 / 1200, rel_tol=0.01)
    assert open_image(big).size == (1600, 1200)
    small = CaptionRequest("small", mk.jpeg_bytes(mk.photo_image((320, 240))))
    assert open_image(small, QWEN_DEFAULT_CAP).size == (320, 240)


def test_captioners_apply_the_cap_of_their_family(family):
    name, loaded = family
    assert Captioner(loaded, GenerationSettings()).max_pixels == (QWEN_DEFAULT_CAP if name == "qwen2_vl" else None)


def test_the_pixel_cap_bounds_qwen2_vl_image_tokens(tiny_qwen2_vl_dir):
    default = load_model(ModelSettings(model=str(tiny_qwen2_vl_dir)))
    tokens = image_tokens(default, (1600, 1200))
    assert 16 < tokens <= QWEN_DEFAULT_CAP // (28 * 28)
    capped = load_model(ModelSettings(model=str(tiny_qwen2_vl_dir), max_image_pixels=16 * 28 * 28))
    assert Captioner(capped, GenerationSettings()).max_pixels == 16 * 28 * 28
    assert 0 < image_tokens(capped, (1600, 1200)) <= 16 < tokens  # the explicit cap lowers it further
    assert image_tokens(capped, (100, 100)) == image_tokens(default, (100, 100))  # smaller images are untouched


def test_an_unset_pixel_cap_keeps_existing_fingerprints():
    spec = {"name": "a", "model": {"model": "m"}}
    unset = CaptionConfig.model_validate(spec)
    assert unset.fingerprint_settings().startswith(
        '{"model":"m","revision":null,"dtype":"auto","device":"auto","trust_remote_code":false}'
    )
    capped = CaptionConfig.model_validate({**spec, "model": {"model": "m", "max_image_pixels": 200_000}})
    assert capped.fingerprint_settings() != unset.fingerprint_settings()
    assert '"max_image_pixels":200000' in capped.fingerprint_settings()
    with pytest.raises(ValueError, match="max_image_pixels"):
        ModelSettings(model="m", max_image_pixels=10)


def test_the_cli_option_reaches_the_model_settings():
    from densecurate.cli import build_parser
    from densecurate.commands import caption_config_from_args

    parser = build_parser()
    args = parser.parse_args(["caption", "R", "--model", "m", "--max-image-pixels", "200000"])
    assert caption_config_from_args(args).model.max_image_pixels == 200_000
    unset = caption_config_from_args(parser.parse_args(["caption", "R", "--model", "m"]))
    assert unset.model.max_image_pixels is None
