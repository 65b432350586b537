"""``load_pipeline(loras=...)`` and ``ckpt generate --lora``: LoRAs applied as the weights
go into the modules, by the bake's own code.

- A tiny SD 1.x (kohya LoRA on the UNet and CLIP, strengths 0.8 and 0.5) and a tiny FLUX.1
  dev (a diffusers-named LoRA whose q, k, v modules land on rows of the BFL file's fused
  weights, which the load splits again) give the same parameters, bit for bit, and so the
  same latents, as the file ``ckpt lora bake`` writes, loaded plainly (fp32: the same math
  runs, cast once to the same dtype).
- A model given as parts: each module lands in the file that holds its layer.
- A LoRA with a module that lands nowhere is refused before any model weight is read, with
  bake's reasons; ``allow_unmatched`` loads the others and says what was left out.
- The PNG's ``parameters`` name each LoRA as AUTOMATIC1111 does: a ``<lora:name:weight>``
  tag after the prompt and ``Lora hashes: "name: hash"``, the hash being the first 12 hex
  digits of the SHA-256 of the safetensors file after its header (A1111's "addnet" hash,
  Civitai's AutoV3).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from helpers import run_cli  # noqa: E402
from lora_files import make_lora  # noqa: E402
from PIL import Image  # noqa: E402
from pipelines import latents  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ckptkit import load_pipeline  # noqa: E402
from ckptkit.formats.checkpoint import LazyTensor  # noqa: E402
from ckptkit.lora.bake import LoraSpec, NotApplied, bake  # noqa: E402
from ckptkit.ops.parts import split  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters"),
              pytest.mark.usefixtures("one_thread")]


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def _assert_same_pipes(ours, baked, changed_at_least: int, plain=None):
    a, b = _state(ours), _state(baked)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:3]
    if plain is not None:
        base = _state(plain)
        assert sum(not torch.equal(a[k], base[k]) for k in a) >= changed_at_least


CASES = {
    "sd1": (["diffusion_model", "clip_l"], "kohya", LoraSpec("", 0.8, 0.5), 20),
    "flux1-dev": (["diffusion_model", "clip_l"], "diffusers", LoraSpec("", 0.9), 20),
}


@pytest.mark.parametrize("fid", list(CASES))
def test_a_lora_loaded_equals_the_baked_file(fid, tiny, tokenizers, tmp_path):
    components, fmt, spec, changed = CASES[fid]
    lora = make_lora(tmp_path / "lora.safetensors", fid, components, fmt, every=3)
    spec = LoraSpec(str(lora), spec.strength, spec.te_strength)
    model = str(tiny(fid))
    baked = tmp_path / "baked.safetensors"
    bake(model, [spec], str(baked), fsync=False)
    entry = (spec.path, spec.strength) if spec.te_strength is None else \
        (spec.path, spec.strength, spec.te_strength)
    ours = load_pipeline(model, loras=[entry], tokenizers=tokenizers)
    theirs = load_pipeline(str(baked), tokenizers=tokenizers)
    plain = load_pipeline(model, tokenizers=tokenizers)
    _assert_same_pipes(ours, theirs, changed, plain)
    assert torch.equal(latents(ours, fid), latents(theirs, fid))


def test_two_loras_on_a_model_given_as_parts(tiny, tokenizers, tmp_path):
    """The UNet's modules land in the diffusion model's file, CLIP's in the text encoder's;
    two LoRAs apply in order, as one bake of both does."""
    a = make_lora(tmp_path / "a.safetensors", "sd1", ["diffusion_model", "clip_l"], "kohya",
                  every=2, seed=1)
    b = make_lora(tmp_path / "b.safetensors", "sd1", ["diffusion_model"], "diffusers",
                  every=3, seed=2)
    model = str(tiny("sd1"))
    paths = split(model, str(tmp_path / "parts"))
    unet = next(p for p in paths if "diffusion_models" in p)
    encoders = [p for p in paths if "text_encoders" in p]
    vae = next(p for p in paths if os.sep + "vae" + os.sep in p)
    baked = tmp_path / "baked.safetensors"
    bake(model, [LoraSpec(str(a), 0.7), LoraSpec(str(b), -0.4)], str(baked), fsync=False)
    ours = load_pipeline(diffusion_model=unet, text_encoders=encoders, vae=vae,
                         loras=[(str(a), 0.7), (str(b), -0.4)], tokenizers=tokenizers)
    _assert_same_pipes(ours, load_pipeline(str(baked), tokenizers=tokenizers), 0)


def _with_a_stray_module(tmp_path):
    lora = make_lora(tmp_path / "stray.safetensors", "sd1", ["diffusion_model"], "kohya",
                     every=4)
    tensors = load_file(str(lora))
    tensors["lora_unet_no_such_block_proj.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_no_such_block_proj.lora_up.weight"] = torch.zeros(32, 4)
    save_file(tensors, str(lora))
    return lora


def test_a_module_that_lands_nowhere_refuses_before_any_weight_is_read(
        tiny, tokenizers, tmp_path, monkeypatch):
    model = str(tiny("sd1"))
    lora = _with_a_stray_module(tmp_path)
    for name in ("read", "load", "read_rows", "raw"):
        real = getattr(LazyTensor, name)

        def refuse(self, *args, _real=real):
            if self.source.path == model:
                raise AssertionError("a model tensor was read")
            return _real(self, *args)

        monkeypatch.setattr(LazyTensor, name, refuse)
    with pytest.raises(NotApplied) as refused:
        load_pipeline(model, loras=[str(lora)], tokenizers=tokenizers)
    message = str(refused.value)
    assert "stray.safetensors: 1 module" in message and "nothing was loaded" in message
    assert "allow_unmatched loads the others" in message
    with pytest.raises(NotApplied) as baked:
        bake(model, [LoraSpec(str(lora))], str(tmp_path / "x.safetensors"))
    assert str(baked.value).split(": ", 1)[1].split(";")[0] == \
        message.split(": ", 1)[1].split(";")[0]  # the same reasons
    monkeypatch.undo()
    pipe = load_pipeline(model, loras=[str(lora)], allow_unmatched=True, tokenizers=tokenizers)
    assert any("stray.safetensors: 1 module left out" in w for w in pipe.ckptkit_warnings)


def _addnet_hash(path) -> str:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_generate_with_loras_names_them_in_the_png(tiny, tokenizers, tmp_path, capsys):
    a = make_lora(tmp_path / "style,one.safetensors", "sd1", ["diffusion_model", "clip_l"],
                  "kohya", every=3, seed=1, metadata={"ss_output_name": "x"})
    b = make_lora(tmp_path / "b.safetensors", "sd1", ["diffusion_model"], "kohya", every=5)
    out = tmp_path / "out.png"
    code, _, err = run_cli(capsys, "generate", tiny("sd1"), "--prompt", "a cat", "--steps", "1",
                           "--size", "32x32", "--seed", "1", "--tokenizers", tokenizers,
                           "--quiet", "--lora", f"{a}:0.8:0.5", "--lora", str(b), "-o", out)
    assert (code, err) == (0, ""), err
    with Image.open(out) as image:
        text = image.text["parameters"]
    prompt, settings = text.split("\n", 1)
    assert prompt == "a cat <lora:style,one:0.5:0.8> <lora:b:1>"
    assert (f'Lora hashes: "styleone: {_addnet_hash(a)[:12]}, b: {_addnet_hash(b)[:12]}"'
            in settings)
