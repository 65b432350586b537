"""``ckpt generate``: images from tiny checkpoints, offline, with the settings the model was
made for and AUTOMATIC1111's ``parameters`` text.

- The same seed and settings give the same PNG, bit for bit; another seed another image.
- The text is A1111's infotext: prompt, ``Negative prompt:``, then ``Key: value`` pairs in
  A1111's order, values with commas or colons quoted as JSON; the model hash is the first 10
  hex digits of the file's SHA-256 (computed here with hashlib).
- A file whose ModelSpec says SDXL Turbo gets 1 step without guidance, unasked.
- FLUX.1 from its parts (split files, given in any order) gets its own settings.
- Bad requests end in one line and the usage exit code, with no output written.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from PIL import Image

from ckptkit import open as ckpt_open
from ckptkit import save_safetensors
from ckptkit.ops.generate import generate
from ckptkit.ops.parts import split
from ckptkit.ops.sample import sample

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")


@pytest.fixture(scope="module")
def sd1(module_tmp):
    path = module_tmp("sd1") / "tiny-sd1.safetensors"
    sample("sd1", str(path), tiny=True, seed=3)
    return path


def _parameters(png) -> str:
    with Image.open(png) as image:
        return image.text["parameters"]


def _pixels(png) -> bytes:
    with Image.open(png) as image:
        return image.tobytes()


def test_same_seed_same_png_and_the_a1111_parameters(sd1, tokenizers, tmp_path, capsys):
    outs = [tmp_path / f"{n}.png" for n in ("a", "b", "c")]
    args = [sd1, "--prompt", "a cat, on: the dog", "--negative", "blurry", "--steps", "2",
            "--size", "64x48", "--tokenizers", tokenizers, "--quiet"]
    for out, seed in zip(outs, (5, 5, 6), strict=True):
        code, stdout, err = run_cli(capsys, "generate", *args, "--seed", seed, "-o", out)
        assert (code, err) == (0, ""), err
        assert "2 steps" in stdout and f"seed {seed}" in stdout
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert _pixels(outs[0]) != _pixels(outs[2])
    with Image.open(outs[0]) as image:
        assert image.size == (64, 48)
    short = hashlib.sha256(sd1.read_bytes()).hexdigest()[:10]
    assert _parameters(outs[0]) == (
        "a cat, on: the dog\nNegative prompt: blurry\n"
        f"Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 5, Size: 64x48, Model hash: {short}, "
        "Model: tiny-sd1, Version: ckptkit 0.1.0")


def test_values_with_commas_are_quoted_and_the_vae_is_named(sd1, tokenizers, tmp_path,
                                                            capsys):
    vae = tmp_path / "my, vae.safetensors"
    sample("sd1", str(vae), components=["vae"], tiny=True, seed=9)
    out = tmp_path / "v.png"
    code, _, err = run_cli(capsys, "generate", sd1, "--vae", vae, "--prompt", "x",
                           "--steps", "1", "--size", "32x32", "--seed", "1", "--sampler",
                           "dpmpp_2m_karras", "--tokenizers", tokenizers, "--quiet", "-o", out)
    assert code == 0, err
    text = _parameters(out)
    short = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert "Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 7.5" in text
    assert f'VAE hash: {short}, VAE: "my, vae", Version' in text


def test_a_modelspec_sdxl_turbo_gets_one_step_without_guidance(tokenizers, tmp_path, capsys):
    plain, turbo = tmp_path / "sdxl.safetensors", tmp_path / "turbo.safetensors"
    sample("sdxl", str(plain), tiny=True)
    with ckpt_open(plain) as ckpt:
        save_safetensors(dict(ckpt), turbo, {**ckpt.metadata, "modelspec.architecture":
                                             "stable-diffusion-xl-turbo-v1"})
    out = tmp_path / "t.png"
    code, stdout, err = run_cli(capsys, "generate", turbo, "--prompt", "a cat", "--json",
                                "--tokenizers", tokenizers, "--size", "32x32", "-o", out)
    assert code == 0, err
    chosen = json.loads(stdout)["settings"]
    assert (chosen["steps"], chosen["guidance"], chosen["sampler"], chosen["preset"]) == (
        1, 0.0, "Euler a", "turbo")
    assert "Steps: 1, Sampler: Euler a, CFG scale: 0," in _parameters(out)
    code, stdout, _ = run_cli(capsys, "generate", plain, "--prompt", "a cat", "--json",
                              "--tokenizers", tokenizers, "--size", "32x32", "--steps", "1",
                              "-o", tmp_path / "p.png")
    assert json.loads(stdout)["settings"]["guidance"] == 5.0  # the base model's


def test_flux_from_its_parts_in_any_order(tokenizers, tmp_path, capsys):
    mono = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(mono), tiny=True)
    parts = split(str(mono), str(tmp_path / "parts"))
    out, again = tmp_path / "f.png", tmp_path / "g.png"
    common = ["--prompt", "a cat", "--steps", "2", "--size", "32x32", "--seed", "3",
              "--tokenizers", tokenizers, "--quiet"]
    code, _, err = run_cli(capsys, "generate", *reversed(parts), *common, "-o", out)
    assert code == 0, err
    text = _parameters(out)
    assert "CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 3, Size: 32x32" in text
    model = next(p for p in parts if "diffusion_models" in p)
    assert f"Model hash: {hashlib.sha256(Path(model).read_bytes()).hexdigest()[:10]}" in text
    code, _, err = run_cli(capsys, "generate", mono, *common, "-o", again)
    assert code == 0, err
    assert _pixels(out) == _pixels(again)


def test_schnell_defaults_and_each_step_reported(tokenizers, tmp_path):
    path = tmp_path / "schnell.safetensors"
    sample("flux1-schnell", str(path), tiny=True)
    steps = []
    report = generate([str(path)], "a cat", str(tmp_path / "s.png"), size=(32, 32), seed=1,
                      tokenizers=tokenizers, on_step=lambda done, total: steps.append(
                          (done, total)))
    assert (report["settings"]["steps"], report["settings"]["guidance"]) == (4, 0.0)
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(("extra", "message"), [
    (["--size", "30x30"], "multiples of 8"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--preset", "schnell"], "the schnell preset is for"),
    (["--sampler", "heun"], "--sampler must be one of"),
    (["--steps", "0"], "at least 1"),
])
def test_bad_requests_are_one_line_and_write_nothing(sd1, tokenizers, tmp_path, capsys,
                                                     extra, message):
    out = tmp_path / "x.png"
    code, _, err = run_cli(capsys, "generate", sd1, "--prompt", "a", "--tokenizers",
                           tokenizers, "-o", out, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_what_generate_cannot_do_is_said(tokenizers, tmp_path, capsys):
    refiner = tmp_path / "refiner.safetensors"
    sample("sdxl-refiner", str(refiner), tiny=True)
    flux = tmp_path / "flux.safetensors"
    sample("flux1-schnell", str(flux), tiny=True)
    cases = [([refiner], "refines an image"), ([flux, "--negative", "x"], "no negative"),
             ([flux, "--sampler", "ddim"], "flow-matching")]
    for args, message in cases:
        code, _, err = run_cli(capsys, "generate", *args, "--prompt", "a", "--tokenizers",
                               tokenizers, "-o", tmp_path / "x.png")
        assert code == 2 and message in err, err
    code, _, err = run_cli(capsys, "generate", flux, "--prompt", "a", "-o",
                           tmp_path / "missing" / "x.png")
    assert code == 5 and "does not exist" in err


def test_without_diffusers_the_error_says_what_to_install(sd1, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises
    code, _, err = run_cli(capsys, "generate", sd1, "--prompt", "a", "-o", tmp_path / "x.png")
    assert code == 2 and "pip install 'ckptkit[generate]'" in err
    assert re.fullmatch(r"ckpt: error: [^\n]+\n", err)
