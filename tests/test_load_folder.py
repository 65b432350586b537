"""A diffusers folder as ``load_pipeline``'s and ``ckpt generate``'s input, offline.

- Our tiny diffusers folder of a seed gives the image its monolithic twin gives, bit for bit
  (SD 1.x; FLUX.1 with its transformer and T5 in shards, as the released folders hold them).
- Its tokenizers come from the folder itself (nothing else is looked at: the search paths
  are empty); its scheduler config is the folder's own.
- A part given beside the folder replaces the folder's; ``generate`` names the folder as the
  model (no file to hash); a scheduler config that names no scheduler is refused in one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_cli
from PIL import Image
from pipelines import image, latents
from safetensors.torch import load_file, save_file

from ckptkit import load_pipeline
from ckptkit.ops.sample import sample

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")


def _folder(fid: str, root, tokenizers=None):
    folder = root / fid
    sample(fid, str(folder), layout="diffusers", tiny=True, dtype="fp32", seed=1)
    if tokenizers:
        index = json.loads((folder / "model_index.json").read_text())
        for attribute in [k for k in index if k.startswith("tokenizer")]:
            kind = "t5" if fid.startswith(("flux", "sd3")) and attribute == "tokenizer_2" \
                else "clip"
            shutil.copytree(tokenizers / kind, folder / attribute)
    return folder


def _shard(component):
    """The component's weights in two files, as the released folders shard them."""
    (single,) = component.glob("*.safetensors")
    tensors = load_file(str(single))
    keys = sorted(tensors)
    half = len(keys) // 2
    stem = single.name.removesuffix(".safetensors")
    for n, chunk in enumerate((keys[:half], keys[half:]), 1):
        save_file({k: tensors[k] for k in chunk},
                  str(component / f"{stem}-{n:05d}-of-00002.safetensors"),
                  metadata={"format": "pt"})
    single.unlink()


@pytest.mark.parametrize("fid", ["sd1", "flux1-schnell"])
def test_a_folder_gives_the_monolithicimage(fid, tiny, tokenizers, tmp_path, monkeypatch):
    folder = _folder(fid, tmp_path, tokenizers)
    if fid.startswith("flux"):
        _shard(folder / "transformer")
        _shard(folder / "text_encoder_2")
    for name in ("CKPTKIT_TOKENIZERS", "COMFYUI_PATH", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    from_folder = load_pipeline(str(folder))  # its own tokenizers: nowhere else has any
    from_file = load_pipeline(str(tiny(fid)), tokenizers=tokenizers)
    assert type(from_folder) is type(from_file)
    assert torch.equal(image(from_folder, fid), image(from_file, fid))


def test_the_folders_scheduler_and_a_part_given_beside_it(tiny, tokenizers, tmp_path):
    folder = _folder("sd1", tmp_path)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "prediction_type": "v_prediction"}))
    pipe = load_pipeline(str(folder), tokenizers=tokenizers)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    vae = tmp_path / "vae.safetensors"
    sample("sd1", str(vae), components=["vae"], tiny=True, dtype="fp32", seed=7)
    swapped = load_pipeline(str(folder), vae=str(vae), tokenizers=tokenizers)
    assert torch.equal(latents(pipe, "sd1"), latents(swapped, "sd1"))
    assert not torch.equal(pipe.vae.decoder.conv_out.weight,
                           swapped.vae.decoder.conv_out.weight)


def test_generate_from_a_folder_names_it(tokenizers, tmp_path, capsys):
    folder = _folder("sd1", tmp_path)
    out = tmp_path / "f.png"
    code, _, err = run_cli(capsys, "generate", folder, "--prompt", "a cat", "--steps", "1",
                           "--size", "32x32", "--seed", "2", "--tokenizers", tokenizers,
                           "--quiet", "-o", out)
    assert (code, err) == (0, ""), err
    with Image.open(out) as image:
        text = image.text["parameters"]
    assert "Size: 32x32, Model: sd1, Version" in text  # no file, so no hash
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"_class_name": "os.system"}))
    code, _, err = run_cli(capsys, "generate", folder, "--prompt", "a", "--tokenizers",
                           tokenizers, "-o", tmp_path / "g.png")
    assert code == 3 and "names no diffusers scheduler" in err, err
    assert not (tmp_path / "g.png").exists()
