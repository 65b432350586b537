"""The input images of the pipelines that start from one (the SDXL refiner, inpainting,
InstructPix2Pix, FLUX.1 Fill and Depth/Canny): which arguments each takes, the settings its
publisher runs it with, and the images read, checked and hashed for the PNG's text.

A model made to fill or follow an image gives noise from a prompt alone, so ``generate``
needs the image, and the image decides the output's size (a mask of another size, or sides
the model cannot take, would be resized or cropped silently by diffusers: refused instead).
The infotext records each input as AUTOMATIC1111 does (``Init image hash``: the MD5 of the
image's pixels, ``processing.StableDiffusionProcessingImg2Img.init``), so the PNG says which
image it was made from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, UsageError


@dataclass(frozen=True)
class ImageTask:
    """How a pipeline takes its input image, and the settings its publisher gives it."""

    what: str  # what the model does, for the error when no image is given
    image_argument: str  # the pipeline's argument for --image
    hash_label: str  # the infotext key of the image's hash
    mask: bool  # takes --mask (white: repaint)
    strength: bool  # takes --strength (its default: the pipeline's own)
    image_guidance: bool  # takes --image-guidance (InstructPix2Pix's image CFG)
    steps: int | None = None  # None: the family's
    guidance: float | None = None
    sampler: str | None = None  # a name in generate.SAMPLERS; None: the family's
    source: str = ""


TASKS = {
    # stabilityai/stable-diffusion-xl-refiner-1.0 card: pipe(prompt, image=init_image), the
    # pipeline's default strength 0.3; steps and guidance are the family's
    "StableDiffusionXLImg2ImgPipeline": ImageTask(
        "the SDXL refiner refines an image", "image", "Init image hash", False, True, False,
        source="stabilityai/stable-diffusion-xl-refiner-1.0 model card"),
    # runwayml/stable-diffusion-inpainting card: pipe(prompt, image, mask_image), strength 1
    "StableDiffusionInpaintPipeline": ImageTask(
        "an inpainting model fills a masked image", "image", "Init image hash", True, True,
        False, source="stable-diffusion-inpainting model card"),
    "StableDiffusionXLInpaintPipeline": ImageTask(
        "an inpainting model fills a masked image", "image", "Init image hash", True, True,
        False, source="stable-diffusion-xl-1.0-inpainting-0.1 model card"),
    # timbrooks/instruct-pix2pix: edit_cli.py's defaults (100 steps, text CFG 7.5, image CFG
    # 1.5, k-diffusion's Euler ancestral), which diffusers' pipeline takes as its own
    "StableDiffusionInstructPix2PixPipeline": ImageTask(
        "an InstructPix2Pix model edits an image", "image", "Init image hash", False, False,
        True, 100, 7.5, "euler_a", "timbrooks/instruct-pix2pix edit_cli.py defaults"),
    "StableDiffusionXLInstructPix2PixPipeline": ImageTask(
        "an InstructPix2Pix model edits an image", "image", "Init image hash", False, False,
        True, source="the family's defaults"),
    # black-forest-labs/FLUX.1-Fill-dev card (and diffusers' FluxFillPipeline example): 50
    # steps, guidance 30
    "FluxFillPipeline": ImageTask(
        "FLUX.1 Fill fills a masked image", "image", "Init image hash", True, True, False,
        50, 30.0, source="black-forest-labs/FLUX.1-Fill-dev model card"),
    # FLUX.1-Depth-dev (diffusers' Flux docs): 30 steps, guidance 10; a Canny-dev file has
    # the same shapes and wants 50 at 30 (--steps 50 --guidance 30)
    "FluxControlPipeline": ImageTask(
        "FLUX.1 Depth and Canny follow a control image (a depth or edge map)",
        "control_image", "Control image hash", False, False, False, 30, 10.0,
        source="black-forest-labs/FLUX.1-Depth-dev model card"),
}


def open_image(path: str, role: str):
    """The image at ``path`` as diffusers' ``load_image`` makes it (EXIF orientation
    applied, RGB), read from the local file only (``load_image`` would fetch a URL)."""
    from diffusers.utils import load_image
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as found:
            found.load()
            return load_image(found)
    except FileNotFoundError:
        raise FormatError(f"the {role} does not exist", path) from None
    except IsADirectoryError:
        raise FormatError(f"the {role} is a folder, not an image", path) from None
    except UnidentifiedImageError:
        raise FormatError(f"the {role} is not an image PIL can read", path) from None
    except (OSError, ValueError) as exc:  # truncated, corrupt, too large
        raise FormatError(f"the {role} cannot be read: {exc}", path) from None


def pixels_md5(image) -> str:
    """A1111's ``init_img_hash``: the MD5 of the image's pixel bytes."""
    return hashlib.md5(image.tobytes()).hexdigest()


@dataclass
class Inputs:
    """The images a task runs on, read and checked: the pipeline's arguments and the
    infotext's entries."""

    arguments: dict[str, Any]
    size: tuple[int, int]
    infotext: dict[str, str]


def read_inputs(task: ImageTask | None, pipeline: str, image: str | None,
                mask: str | None, size: tuple[int, int] | None) -> Inputs | None:
    """``image`` and ``mask`` read for ``task`` (None: a pipeline that takes no image, which
    then refuses them). The output size is the image's: a ``size`` or a mask of another size
    is refused."""
    if task is None:
        if image or mask:
            raise UsageError(f"{pipeline} makes images from a prompt alone; it takes no "
                             f"--{'image' if image else 'mask'}")
        return None
    if not image:
        raise UsageError(f"{task.what}: give it with --image FILE"
                         + (" and the area to repaint with --mask FILE (white: repaint)"
                            if task.mask else ""))
    if mask and not task.mask:
        raise UsageError(f"{pipeline} takes no --mask ({task.what})")
    if task.mask and not mask:
        raise UsageError(f"{task.what}: give the area to repaint with --mask FILE "
                         "(white: repaint)")
    picture = open_image(image, "image")
    arguments: dict[str, Any] = {task.image_argument: picture}
    infotext = {task.hash_label: pixels_md5(picture)}
    if size is not None and tuple(size) != picture.size:
        raise UsageError(f"{image} is {picture.size[0]}x{picture.size[1]} but --size asks for "
                         f"{size[0]}x{size[1]}: the output has the input image's size; "
                         "resize the image instead")
    if mask:
        masked = open_image(mask, "mask")
        if masked.size != picture.size:
            raise UsageError(f"{mask} is {masked.size[0]}x{masked.size[1]} but the image "
                             f"{picture.size[0]}x{picture.size[1]}: the mask must have the "
                             "image's size")
        arguments["mask_image"] = masked
        infotext["Mask hash"] = pixels_md5(masked)
    return Inputs(arguments, picture.size, infotext)
