"""SD3.5 Medium's skip-layer guidance (``ckpt generate --slg``): Stability AI's settings
(Stability-AI/sd3.5 sd3_infer.py: scale 2.5, layers 7-9, 1% to 30% of the steps), off unless
asked.

- ``--slg`` makes the image diffusers' ``StableDiffusion3Pipeline`` makes when called with
  those settings itself, and not the one without; the PNG's text says so.
- It is refused in one line where it would do nothing or is not SD3.5 Medium's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from ckptkit import load_pipeline

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

COMMON = ["--prompt", "a cat", "--steps", "4", "--size", "32x32", "--seed", "6", "--quiet"]


def _pixels(png) -> np.ndarray:
    with Image.open(png) as image:
        return np.asarray(image)


def test_slg_is_the_pipelines_own_with_stabilitys_settings(tiny, tokenizers, tmp_path,
                                                           capsys):
    model = tiny("sd3.5-medium")
    plain, guided = tmp_path / "plain.png", tmp_path / "slg.png"
    for out, extra in ((plain, []), (guided, ["--slg"])):
        code, _, err = run_cli(capsys, "generate", model, *COMMON, *extra, "--tokenizers",
                               tokenizers, "-o", out)
        assert (code, err) == (0, ""), err
    with Image.open(guided) as image:
        assert "Skip layer guidance: 2.5 on layers 7 8 9 from 0.01 to 0.3" in \
            image.text["parameters"]
    with Image.open(plain) as image:
        assert "Skip layer guidance" not in image.text["parameters"]
    pipe = load_pipeline(str(model), tokenizers=tokenizers)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a cat", num_inference_steps=4, guidance_scale=4.5, width=32,
                    height=32, generator=torch.Generator("cpu").manual_seed(6),
                    skip_guidance_layers=[7, 8, 9], skip_layer_guidance_scale=2.5,
                    skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.3).images[0]
    assert np.array_equal(_pixels(guided), np.asarray(expected))
    assert not np.array_equal(_pixels(guided), _pixels(plain))


@pytest.mark.parametrize(("fid", "extra", "message"), [
    ("sd1", ["--slg"], "not Stable Diffusion 1.x"),
    ("sd3.5-medium", ["--slg", "--guidance", "1"], "classifier-free guidance"),
    ("sd3.5-medium", ["--slg", "0"], "a scale above 0"),
    ("sd3.5-medium", ["--slg", "--steps", "2"], "give --steps 4 or more"),
])
def test_slg_where_it_would_do_nothing_is_refused(fid, extra, message, tiny, tokenizers,
                                                  tmp_path, capsys):
    out = tmp_path / "x.png"
    code, _, err = run_cli(capsys, "generate", tiny(fid), "--prompt", "a", *extra,
                           "--tokenizers", tokenizers, "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
