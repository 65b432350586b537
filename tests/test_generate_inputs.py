"""Models that start from an image: the SDXL refiner (img2img), SD inpainting, SD 1.x
InstructPix2Pix, FLUX.1 Fill and FLUX.1 Depth/Canny.

- Each tiny variant loads into the diffusers class the released folders name, and gives the
  same latents, bit for bit, as diffusers' own ``from_pretrained`` of our tiny diffusers
  folder of the same seed, for the same input images.
- ``ckpt generate --image [--mask]`` makes the same PNG twice, with the publisher's settings
  and A1111's ``Init image hash`` (the MD5 of the image's RGB pixels, computed here with
  hashlib and PIL) and ``Denoising strength`` in its text.
- A missing or unreadable image, a mask or ``--size`` of another size, an option the model
  does not take: one line, the right exit code, nothing written.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack

import pytest
import torch
from helpers import run_cli
from PIL import Image
from pipelines import SIZE, diffusers_folder, realigned

from ckptkit import load_pipeline
from ckptkit.ops.generate import settings
from ckptkit.ops.load import plan_pipeline
from ckptkit.ops.sample import sample

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

# case -> (family, variant, the diffusers class)
CASES = {
    "refiner": ("sdxl-refiner", None, "StableDiffusionXLImg2ImgPipeline"),
    "inpaint": ("sd1", "inpaint", "StableDiffusionInpaintPipeline"),
    "sd2-inpaint": ("sd2", "inpaint", "StableDiffusionInpaintPipeline"),
    "pix2pix": ("sd1", "pix2pix", "StableDiffusionInstructPix2PixPipeline"),
    "fill": ("flux1-dev", "fill", "FluxFillPipeline"),
    "depth": ("flux1-dev", "depth", "FluxControlPipeline"),
}


@pytest.fixture(scope="module")
def models(module_tmp):
    """case -> its tiny monolithic file (fp32, seed 1)."""
    root = module_tmp("variants")
    made = {}

    def get(case: str):
        if case not in made:
            fid, variant, _ = CASES[case]
            made[case] = root / f"{case}.safetensors"
            sample(fid, str(made[case]), tiny=True, dtype="fp32", seed=1, variant=variant)
        return made[case]

    return get


@pytest.fixture(scope="module")
def pictures(module_tmp):
    """A noisy RGB image, a mask with a white square, and a mask of another size."""
    root = module_tmp("pictures")
    noise = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=noise, dtype=torch.uint8)
    Image.fromarray(pixels.numpy(), "RGB").save(root / "image.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(root / "mask.png")
    Image.new("L", (SIZE + 8, SIZE), 255).save(root / "wide_mask.png")
    (root / "notes.png").write_text("not an image")
    return root


def _call(case: str, pictures, seed: int = 0) -> dict:
    image = Image.open(pictures / "image.png").convert("RGB")
    kwargs = dict(prompt="a cat on the dog", num_inference_steps=2, output_type="latent",
                  generator=torch.Generator().manual_seed(seed))
    if case == "depth":
        kwargs.update(control_image=image, height=SIZE, width=SIZE)
    else:
        kwargs["image"] = image
    if case in ("inpaint", "sd2-inpaint", "fill"):
        kwargs.update(mask_image=Image.open(pictures / "mask.png"), height=SIZE, width=SIZE)
    if case == "refiner":
        kwargs["strength"] = 0.5  # one of the two steps
    if case in ("fill", "depth"):
        kwargs["max_sequence_length"] = 16
    return kwargs


def _latents(pipe, case, pictures):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**_call(case, pictures)).images


@pytest.mark.parametrize("case", list(CASES))
def test_the_released_class_and_the_latents_of_diffusers_own(case, models, pictures,
                                                             tokenizers, tmp_path):
    ours = load_pipeline(str(models(case)), tokenizers=tokenizers)
    assert type(ours).__name__ == CASES[case][2]
    fid, variant, _ = CASES[case]
    folder = tmp_path / case
    sample(fid, str(folder), layout="diffusers", tiny=True, dtype="fp32", seed=1,
           variant=variant)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] \
        == CASES[case][2]
    theirs = realigned(diffusers_folder(fid, folder, ours))
    assert type(theirs) is type(ours)
    first = _latents(ours, case, pictures)
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    assert torch.equal(first, _latents(ours, case, pictures))
    assert torch.equal(first, _latents(theirs, case, pictures))


def _md5(path, mode: str = "RGB") -> str:
    with Image.open(path) as image:
        return hashlib.md5(image.convert(mode).tobytes()).hexdigest()


def _parameters(png) -> str:
    with Image.open(png) as image:
        return image.text["parameters"]


@pytest.mark.parametrize(("case", "extra", "expected"), [
    ("refiner", ["--steps", "4"], "Init image hash: {image}, Denoising strength: 0.3,"),
    ("inpaint", ["--mask", "{mask}", "--strength", "0.75"],
     "Init image hash: {image}, Mask hash: {mask_md5}, Denoising strength: 0.75,"),
    ("pix2pix", ["--image-guidance", "1.25"],
     "Sampler: Euler a, CFG scale: 7.5, Image CFG scale: 1.25, Seed: 4, Size: 32x32"),
    ("fill", ["--mask", "{mask}"],
     "CFG scale: 1, Distilled CFG Scale: 30, Seed: 4, Size: 32x32"),
    ("depth", [], "Distilled CFG Scale: 10, Seed: 4, Size: 32x32, "),
])
def test_generate_from_an_image_twice_the_same_png(case, extra, expected, models, pictures,
                                                    tokenizers, tmp_path, capsys):
    mask = pictures / "mask.png"
    extra = [a.format(mask=mask) for a in extra]
    steps = [] if "--steps" in extra else ["--steps", "2"]
    outs = [tmp_path / "a.png", tmp_path / "b.png"]
    for out in outs:
        code, _, err = run_cli(capsys, "generate", models(case), "--image",
                               pictures / "image.png", *extra, *steps, "--prompt", "a cat",
                               "--seed", "4", "--tokenizers", tokenizers, "--quiet",
                               "-o", out)
        assert (code, err) == (0, ""), err
    assert outs[0].read_bytes() == outs[1].read_bytes()
    with Image.open(outs[0]) as image:
        assert image.size == (SIZE, SIZE)
    text = _parameters(outs[0])
    assert expected.format(image=_md5(pictures / "image.png"),
                           mask_md5=_md5(mask)) in text, text
    label = "Control image hash" if case == "depth" else "Init image hash"
    assert f"{label}: {_md5(pictures / 'image.png')}" in text


def test_each_task_gets_its_publishers_settings(models, tmp_path):
    """FLUX.1 Fill 50 steps at 30 (strength 1), Depth 30 at 10, InstructPix2Pix 100 steps of
    Euler a at 7.5 and image guidance 1.5, the refiner diffusers' strength 0.3 (from the
    plan alone)."""
    expected = {"fill": (50, 30.0, 1.0, None), "depth": (30, 10.0, None, None),
                "pix2pix": (100, 7.5, None, 1.5), "refiner": (50, 5.0, 0.3, None),
                "inpaint": (50, 7.5, 1.0, None)}
    for case, want in expected.items():
        with ExitStack() as stack:
            plan = plan_pipeline(str(models(case)), stack=stack)
            chosen = settings(plan, seed=1)
        assert (chosen.steps, chosen.guidance, chosen.strength, chosen.image_guidance) \
            == want, case


@pytest.mark.parametrize(("case", "extra", "code", "message"), [
    ("inpaint", [], 2, "give it with --image FILE and the area to repaint with --mask"),
    ("inpaint", ["--image", "{image}"], 2, "give the area to repaint with --mask"),
    ("inpaint", ["--image", "{image}", "--mask", "{wide}"], 2, "the mask must have the "
                                                              "image's size"),
    ("depth", ["--image", "{image}", "--size", "64x64"], 2, "the output has the input "
                                                           "image's size"),
    ("refiner", ["--image", "{missing}"], 3, "the image does not exist"),
    ("refiner", ["--image", "{notes}"], 3, "the image is not an image PIL can read"),
    ("refiner", ["--image", "{image}", "--mask", "{image}"], 2, "takes no --mask"),
    ("refiner", ["--image", "{image}", "--steps", "2"], 2, "redo none of the image"),
    ("pix2pix", ["--image", "{image}", "--strength", "0.5"], 2, "takes no --strength"),
    ("inpaint", ["--image", "{image}", "--mask", "{mask}", "--strength", "1.5"], 2,
     "at most 1"),
    (None, ["--image", "{image}"], 2, "from a prompt alone; it takes no --image"),
    (None, ["--strength", "0.5"], 2, "--strength is for models that start from an image"),
])
def test_bad_inputs_are_one_line_and_write_nothing(case, extra, code, message, models,
                                                   pictures, tiny, tokenizers, tmp_path,
                                                   capsys):
    model = models(case) if case else tiny("sd1")
    names = {"image": pictures / "image.png", "mask": pictures / "mask.png",
             "wide": pictures / "wide_mask.png", "missing": pictures / "absent.png",
             "notes": pictures / "notes.png"}
    out = tmp_path / "x.png"
    found, _, err = run_cli(capsys, "generate", model, *[a.format(**names) for a in extra],
                            "--prompt", "a", "--tokenizers", tokenizers, "-o", out)
    assert found == code and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
