"""SHA-256 of official model releases: what weights alone cannot tell (v-prediction,
distillation) a known file's hash can. Used only with ``--hash`` (hashing reads the whole
file). Each entry says where its hash was published; every one was found in at least two
independent public sources (the Hugging Face LFS object id, the publisher's README or docs,
or other tools' pinned download lists)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    name: str
    family: str
    variants: tuple[str, ...]
    component: str | None  # None: a whole checkpoint; else the one component the file holds
    source: str


RELEASES: dict[str, Release] = {
    "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa": Release(
        "v1-5-pruned-emaonly.safetensors", "sd1", (), None,
        "Hugging Face LFS object of stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac": Release(
        "v2-1_768-ema-pruned.safetensors", "sd2", ("v-prediction",), None,
        "stabilityai/stable-diffusion-2-1 (pinned by SwarmUI and AUTOMATIC1111 listings)"),
    "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b": Release(
        "sd_xl_base_1.0.safetensors", "sdxl", (), None,
        "Hugging Face x-linked-etag of stabilityai/stable-diffusion-xl-base-1.0"),
    "7440042bbdc8a24813002c09b6b69b64dc90fded4472613437b7f55f9b7d9c5f": Release(
        "sd_xl_refiner_1.0.safetensors", "sdxl-refiner", (), None,
        "Stability AI generative-models README (File Hash)"),
    "e869ac7d6942cb327d68d5ed83a40447aadf20e0c3358d98b2cc9e270db0da26": Release(
        "sd_xl_turbo_1.0_fp16.safetensors", "sdxl", ("turbo",), None,
        "stabilityai/sdxl-turbo (pinned with its revision by several tools)"),
    "4610115bb0c89560703c892c59ac2742fa821e60ef5871b33493ba544683abd7": Release(
        "flux1-dev.safetensors", "flux1-dev", (), "diffusion_model",
        "Black Forest Labs flux README, and the Hugging Face LFS object id"),
    "9403429e0052277ac2a87ad800adece5481eecefd9ed334e1f348723621d2a0a": Release(
        "flux1-schnell.safetensors", "flux1-schnell", (), "diffusion_model",
        "Black Forest Labs flux README"),
    "afc8e28272cd15db3919bacdb6918ce9c1ed22e96cb12c4d5ed0fba823529e38": Release(
        "ae.safetensors (FLUX.1 VAE)", "flux1-dev", (), "vae",
        "Hugging Face LFS object id (black-forest-labs/FLUX.1-schnell)"),
    "6e480b09fae049a72d2a8c5fbccb8d3e92febeb233bbe9dfe7256958a9167635": Release(
        "t5xxl_fp16.safetensors (ComfyUI)", "flux1-dev", (), "t5xxl",
        "Hugging Face LFS object id (comfyanonymous/flux_text_encoders)"),
}


def lookup(sha256: str) -> Release | None:
    return RELEASES.get(sha256.lower())
