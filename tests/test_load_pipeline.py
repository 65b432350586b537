"""``ckptkit.load_pipeline`` against diffusers itself, offline.

- Every family's tiny monolithic sample loads into its diffusers pipeline and generates the
  same latents twice for one seed, with sockets blocked and ``HF_HUB_OFFLINE`` unset: no
  network call is attempted (one would raise).
- The pipeline ckptkit loads from the monolithic file gives the same latents, bit for bit,
  as the one diffusers' ``from_pretrained`` loads from our diffusers folder of the same seed
  (a local folder); our configs and moves were checked against diffusers' classes and
  converters in test_diffusers_layout.py and test_diffusers_dit.py.
- Parts: a split checkpoint loads from its parts to the same image; a VAE from another file
  changes the decode only; a pickle gives what its safetensors twin gives; parts that do not
  belong together, or a model without its text encoders, are refused before any tensor is
  read; without a tokenizer the error says where ckptkit looked and what to pass.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest
import torch
from pipelines import diffusers_folder, image, latents, realigned

from ckptkit import load_pipeline
from ckptkit.arch.families import families
from ckptkit.errors import UsageError
from ckptkit.formats.checkpoint import LazyTensor
from ckptkit.ops.parts import split
from ckptkit.ops.sample import sample

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")

@pytest.fixture(scope="module")
def loaded(tiny, tokenizers):
    """family -> ckptkit's pipeline of its tiny sample, as loaded, made once (loading is
    what most tests check; the pipelines are only read)."""
    made = {}

    def get(fid: str):
        if fid not in made:
            made[fid] = load_pipeline(str(tiny(fid)), tokenizers=tokenizers)
        return made[fid]

    return get


EXPECTED = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
            "sdxl": "StableDiffusionXLPipeline",
            "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
            "sd3-medium": "StableDiffusion3Pipeline", "sd3.5-medium": "StableDiffusion3Pipeline",
            "sd3.5-large": "StableDiffusion3Pipeline", "flux1-dev": "FluxPipeline",
            "flux1-schnell": "FluxPipeline"}


def test_the_network_is_blocked():
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


@pytest.mark.parametrize("fid", list(families()))
def test_every_family_loads_and_generates_deterministically(fid, tiny, tokenizers):
    assert fid in EXPECTED, "a family without an expected pipeline"
    pipe = load_pipeline(str(tiny(fid)), tokenizers=tokenizers)  # as loaded, not realigned
    assert type(pipe).__name__ == EXPECTED[fid]
    first, again = latents(pipe, fid), latents(pipe, fid)
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    assert torch.equal(first, again)


@pytest.mark.parametrize("fid", ["sd1", "sd2", "sdxl", "sd3.5-medium", "flux1-dev"])
def test_same_latents_as_diffusers_from_our_folder(fid, loaded, tmp_path):
    ours = loaded(fid)
    folder = tmp_path / fid
    sample(fid, str(folder), layout="diffusers", tiny=True, dtype="fp32", seed=1)
    theirs = realigned(diffusers_folder(fid, folder, ours))
    assert type(theirs) is type(ours)
    assert dict(theirs.scheduler.config) == dict(ours.scheduler.config)
    assert torch.equal(latents(ours, fid), latents(theirs, fid))


def test_diffusers_layout_files_load_too(tiny, loaded, tokenizers, tmp_path):
    """A checkpoint whose diffusion model is a diffusers-named file, beside the monolithic
    file's other parts: the same model, the same latents."""
    model = tmp_path / "transformer.safetensors"
    sample("flux1-dev", str(model), layout="diffusers", components=["diffusion_model"],
           tiny=True, dtype="fp32", seed=1)
    mono = loaded("flux1-dev")
    mixed = load_pipeline(str(tiny("flux1-dev")), diffusion_model=str(model),
                          tokenizers=tokenizers)
    assert torch.equal(latents(mono, "flux1-dev"), latents(mixed, "flux1-dev"))


@pytest.mark.parametrize("fid", ["sd1", "flux1-schnell"])
def test_parts_alone_give_the_monolithic_image(fid, tiny, loaded, tokenizers, tmp_path):
    paths = split(str(tiny(fid)), str(tmp_path))
    model = next(p for p in paths if "diffusion_models" in p)
    encoders = [p for p in paths if "text_encoders" in p]
    vae = next(p for p in paths if os.sep + "vae" + os.sep in p)
    parts = load_pipeline(diffusion_model=model, text_encoders=encoders, vae=vae,
                          tokenizers=tokenizers)
    params = [p for m in parts.components.values() if isinstance(m, torch.nn.Module)
              for p in m.parameters()]
    assert all(p.data_ptr() % 64 == 0 for p in params)  # what makes the image bit for bit
    assert torch.equal(image(parts, fid), image(loaded(fid), fid))


def test_a_file_that_aligns_no_tensor_gives_the_same_image(tiny, loaded, tokenizers, tmp_path):
    """safetensors' own writer aligns the data to 8 bytes only: with a metadata entry that
    makes the data start off a 64-byte boundary, the weights sit unaligned in the file.
    ckptkit reads those into aligned memory of their own, so the image is the one its own
    (aligned) file gives, bit for bit."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny("sd1")))
    out = tmp_path / "unaligned.safetensors"
    for pad in range(64):
        save_file(tensors, str(out), metadata={"pad": "x" * pad})
        with open(out, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
        if (8 + size) % 64:
            break
    assert (8 + size) % 64, "no padding put the data off a 64-byte boundary"
    pipe = load_pipeline(str(out), tokenizers=tokenizers)
    params = [p for m in pipe.components.values() if isinstance(m, torch.nn.Module)
              for p in m.parameters()]
    assert all(p.data_ptr() % 64 == 0 for p in params)
    assert torch.equal(image(pipe, "sd1"), image(loaded("sd1"), "sd1"))


def test_another_vae_changes_the_decode_only(tiny, loaded, tokenizers, tmp_path):
    vae = tmp_path / "vae.safetensors"
    sample("sd1", str(vae), components=["vae"], tiny=True, dtype="fp32", seed=7)
    own = loaded("sd1")
    swapped = load_pipeline(str(tiny("sd1")), vae=str(vae), tokenizers=tokenizers)
    assert torch.equal(latents(own, "sd1"), latents(swapped, "sd1"))
    assert not torch.equal(image(own, "sd1"), image(swapped, "sd1"))
    assert torch.equal(own.unet.conv_in.weight, swapped.unet.conv_in.weight)


def test_a_pickle_loads_as_its_safetensors_twin(loaded, tokenizers, tmp_path):
    ckpt = tmp_path / "sd1.ckpt"
    sample("sd1", str(ckpt), tiny=True, dtype="fp32", seed=1)
    from_pickle = load_pipeline(str(ckpt), tokenizers=tokenizers)
    assert torch.equal(latents(from_pickle, "sd1"), latents(loaded("sd1"), "sd1"))


def test_fp16_file_cast_on_load_equals_a_cast_afterwards(tokenizers, tmp_path, monkeypatch):
    """An fp16 file loaded as fp32 holds exactly the stored values, cast: the slice-at-a-time
    cast (slices of 256 bytes here, so that every tensor takes several) is torch's cast."""
    from ckptkit.ops import load

    monkeypatch.setattr(load, "_SLICE_BYTES", 256)
    path = tmp_path / "sd1.safetensors"
    sample("sd1", str(path), tiny=True, dtype="fp16", seed=2)
    as_stored = load_pipeline(str(path), dtype="fp16", tokenizers=tokenizers)
    cast = load_pipeline(str(path), tokenizers=tokenizers)
    assert as_stored.unet.dtype == torch.float16 and cast.unet.dtype == torch.float32
    for (name, a), (_, b) in zip(as_stored.unet.named_parameters(),
                                 cast.unet.named_parameters(), strict=True):
        assert torch.equal(a.float(), b), name


def test_inpainting_and_v_prediction(tokenizers, tmp_path):
    from ckptkit import open as ckpt_open
    from ckptkit import save_safetensors

    inpaint = tmp_path / "inpaint.safetensors"
    sample("sd1", str(inpaint), tiny=True, variant="inpaint")
    pipe = load_pipeline(str(inpaint), tokenizers=tokenizers)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert pipe.unet.config.in_channels == 9 and pipe.unet.config.out_channels == 4
    plain, v = tmp_path / "sd2.safetensors", tmp_path / "sd2-v.safetensors"
    sample("sd2", str(plain), tiny=True)
    with ckpt_open(plain) as ckpt:
        save_safetensors(dict(ckpt), v, {**ckpt.metadata, "modelspec.architecture":
                                         "stable-diffusion-v2-768-v"})
    assert load_pipeline(str(v), tokenizers=tokenizers).scheduler.config.prediction_type \
        == "v_prediction"
    unsaid = load_pipeline(str(plain), tokenizers=tokenizers)
    assert unsaid.scheduler.config.prediction_type == "epsilon"
    assert any("768-v" in w for w in unsaid.ckptkit_warnings)


def _no_reads(monkeypatch):
    def refuse(self, *args):
        raise AssertionError("a tensor was read")

    for name in ("read", "load", "read_rows", "raw"):
        monkeypatch.setattr(LazyTensor, name, refuse)


def test_parts_that_do_not_belong_together_are_refused_unread(tiny, tokenizers, tmp_path,
                                                             monkeypatch):
    vae = tmp_path / "sd_vae.safetensors"
    sample("sd1", str(vae), components=["vae"], tiny=True)
    model = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(model), layout="comfyui", components=["diffusion_model"],
           tiny=True)
    _no_reads(monkeypatch)
    with pytest.raises(UsageError, match="does not fit FLUX"):
        load_pipeline(str(tiny("flux1-dev")), vae=str(vae), tokenizers=tokenizers)
    with pytest.raises(UsageError, match="also needs clip_l, t5xxl, vae"):
        load_pipeline(diffusion_model=str(model), tokenizers=tokenizers)
    with pytest.raises(UsageError, match="given as a VAE but is"):
        load_pipeline(str(tiny("sd1")), vae=str(tiny("sd1")), tokenizers=tokenizers)
    with pytest.raises(UsageError, match="not parts of one model"):
        load_pipeline(str(tiny("sd1")), diffusion_model=str(model), tokenizers=tokenizers)


def test_without_tokenizers_the_error_says_where_it_looked(tiny, tmp_path, monkeypatch):
    for name in ("CKPTKIT_TOKENIZERS", "COMFYUI_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UsageError) as caught:
        load_pipeline(str(tiny("flux1-schnell")))
    message = str(caught.value)
    assert "CLIP tokenizer" in message and "--tokenizers DIR" in message
    assert str(tmp_path / "hf" / "hub") in message and "ComfyUI" in message


def test_tokenizers_are_found_in_a_comfyui_install_and_the_hub_cache(tiny, tokenizers,
                                                                    tmp_path, monkeypatch):
    """ComfyUI's vendored folders above the model file, and a Hub snapshot in the cache."""
    import shutil

    for name in ("CKPTKIT_TOKENIZERS", "COMFYUI_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(tokenizers / "clip", comfy / "comfy" / "sd1_tokenizer")
    models = comfy / "models" / "checkpoints"
    models.mkdir(parents=True)
    shutil.copy(tiny("sd1"), models / "m.safetensors")
    snapshot = (tmp_path / "hf" / "hub" / "models--google--t5-v1_1-xxl" / "snapshots" / "abc")
    shutil.copytree(tokenizers / "t5", snapshot)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert load_pipeline(str(models / "m.safetensors")).tokenizer is not None
    shutil.copy(tiny("flux1-schnell"), models / "f.safetensors")
    pipe = load_pipeline(str(models / "f.safetensors"))
    assert pipe.tokenizer_2("a cat").input_ids[-1] == 1  # T5's end token


def test_clip_vocabulary_from_the_bpe_file_of_an_installed_package(tokenizers, tmp_path,
                                                                  monkeypatch):
    """OpenAI's BPE merges file (as clip-anytorch and open_clip ship it) makes the same
    tokenizer as the vocab.json and merges.txt built from it; found in an installed package
    when nothing else has one. (Checked by hand against the real 1.3 MB file and OpenAI's
    SimpleTokenizer: the same ids for every prompt tried.)"""
    import gzip

    from tiny_tokenizers import MERGES

    from ckptkit.ops import tokenizers as tk

    package = tmp_path / "site" / "clip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    with gzip.open(package / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(MERGES) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("CKPTKIT_TOKENIZERS", "COMFYUI_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    found = tk.find("clip")
    assert found == package / "bpe_simple_vocab_16e6.txt.gz"
    from_bpe, from_folder = tk._clip(found, False), tk._clip(tokenizers / "clip", False)
    assert from_bpe.get_vocab() == from_folder.get_vocab()
    for text in ("a cat on the dog", "the Cat, 42!"):
        assert from_bpe(text).input_ids == from_folder(text).input_ids


# --------------------------------------------------------------------------- memory

_RSS_CHILD = """
import resource, sys, torch
from ckptkit import load_pipeline
import diffusers, transformers  # imported before the baseline is taken
sys.path.insert(0, sys.argv[3])
from tiny_tokenizers import write_all
from pathlib import Path
tok = write_all(Path(sys.argv[2]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pipe = load_pipeline(sys.argv[1], dtype=torch.float32, tokenizers=tok)
weights = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder)
              for p in m.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(base, peak, weights)
"""


@pytest.mark.slow
def test_loading_a_full_size_file_takes_the_weights_memory_only(tmp_path):
    """A full-size SD 1.5-shaped fp16 file loaded as fp32 (every tensor cast): the peak RSS
    the load adds is at most 1.15x the loaded weights'."""
    path = tmp_path / "sd15.safetensors"
    sample("sd1", str(path), dtype="fp16")
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(tmp_path / "tok"),
                          here], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    base, peak, weights = map(int, out.stdout.split()[-3:])
    assert weights > 3.9e9  # about 1.07 G parameters in fp32
    print(f"peak RSS of the load: {(peak - base) / weights:.3f}x the weights' "
          f"{weights / 2**30:.2f} GiB")
    assert peak - base <= 1.15 * weights, (peak - base) / weights
