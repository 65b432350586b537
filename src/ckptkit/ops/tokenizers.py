"""The tokenizers a pipeline needs, found offline: CLIP's BPE vocabulary and T5's.

Tokenizers are not weights, and no checkpoint carries them; diffusers fetches them from the
Hub with the configs. A fresh install of ckptkit has none: transformers and diffusers ship
no vocabulary. The CLIP BPE ships on PyPI inside ``clip-anytorch`` (OpenAI's 1.3 MB
``bpe_simple_vocab_16e6.txt.gz``; its only heavy requirement, torchvision, resolves to the
build made for the pinned torch, so it brings no second torch); no package ships T5's
SentencePiece vocabulary without a model hub behind it. So they are looked for, in order:

0. a diffusers folder's own (``tokenizer/``, ``tokenizer_2/``...), for its text encoders;
1. the folder the user gives (``tokenizers=``, ``--tokenizers DIR``), then
   ``$CKPTKIT_TOKENIZERS``: a tokenizer folder, or a folder of them (one level or two down);
2. a ComfyUI install, which vendors both (``comfy/sd1_tokenizer``: vocab.json and
   merges.txt, used for CLIP-L and CLIP-G alike; ``comfy/text_encoders/t5_tokenizer``:
   tokenizer.json): the one the model file lies in, ``$COMFYUI_PATH``, ``~/ComfyUI``;
3. the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``):
   openai/clip-vit-large-patch14, google/t5-v1_1-xxl, and the tokenizer folders of the
   SD/SDXL/SD3/FLUX pipeline repositories, read from disk only;
4. for CLIP, the BPE file of an installed ``clip-anytorch`` or ``open_clip_torch``.

A CLIP folder is one with ``vocab.json`` and ``merges.txt``; a T5 folder one with a
``tokenizer.json`` whose model is a Unigram (T5's SentencePiece, converted), or a
``spiece.model`` where the ``sentencepiece`` package is installed. The CLIP tokenizer pads
with its end token for OpenAI's CLIP-L (SD 1.x, SDXL, SD3, FLUX) and with ``!`` (id 0) for
the open_clip encoders (SD 2.x's ViT-H, CLIP-G), as ComfyUI's tokenizers do
(``SDXLClipGTokenizer``: ``pad_with_end=False``; CLIP-L's ``SDTokenizer`` pads with the end).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import UsageError

_ATTRIBUTES = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2",
               "text_encoder_3": "tokenizer_3"}
_CLIP_LENGTH = 77
_T5_LENGTH = 512
# Repositories of the Hugging Face cache whose tokenizers are these, most specific first.
_HF_REPOS = ("openai/clip-vit-large-patch14", "google/t5-v1_1-xxl",
             "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell",
             "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium",
             "stabilityai/stable-diffusion-3-medium-diffusers",
             "stabilityai/stable-diffusion-xl-base-1.0",
             "stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
             "stabilityai/stable-diffusion-2-1")
_COMFY = {"clip": ("comfy/sd1_tokenizer",), "t5": ("comfy/text_encoders/t5_tokenizer",)}
_BPE_PACKAGES = (("clip", "bpe_simple_vocab_16e6.txt.gz"),
                 ("open_clip", "bpe_simple_vocab_16e6.txt.gz"))
_BPE_MERGES = 49152 - 256 - 2  # the merges OpenAI's CLIP uses of that file


def kind_of(component: str) -> str:
    return "t5" if component == "t5xxl" else "clip"


def tokenizers_for(plan, given: Any = None) -> dict[str, Any]:
    """The pipeline's tokenizers by attribute (``tokenizer_2``...), for ``plan``'s text
    encoders. ``given``: a folder, or a mapping of attribute -> tokenizer made already."""
    if isinstance(given, Mapping):
        return dict(given)
    model_path = getattr(plan, "model_path", "")
    found = {}
    for part in plan.parts:
        attribute = _ATTRIBUTES.get(part.attribute)
        if attribute is None:
            continue
        kind = kind_of(part.name)
        own = getattr(plan, "tokenizer_folders", {}).get(attribute)
        source = Path(own) if own and _is(kind, Path(own)) else find(kind, given, model_path)
        found[attribute] = (_clip(source, _pads_with_bang(part.name))
                            if kind == "clip" else _t5(source))
    return found


def _pads_with_bang(component: str) -> bool:
    return component in ("clip_g", "openclip_h")


def _candidates(root: Path) -> Iterator[Path]:
    """A folder, the folders in it, and the folders in those (a folder of tokenizer folders,
    or a Hub snapshot whose ``tokenizer_2/`` holds one)."""
    yield root
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for child in children:
        yield child
    for child in children:
        try:
            yield from sorted(p for p in child.iterdir() if p.is_dir())
        except OSError:
            continue


def _is(kind: str, folder: Path) -> bool:
    if kind == "clip":
        return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if (folder / "tokenizer.json").is_file():
        return _unigram(folder / "tokenizer.json")
    return (folder / "spiece.model").is_file() and importlib.util.find_spec(
        "sentencepiece") is not None


def _unigram(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model", {}).get("type") == "Unigram"
    except (OSError, ValueError, AttributeError):
        return False


def _hf_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                      "huggingface")
    return Path(home) / "hub"


def _hf_folders() -> Iterator[Path]:
    cache_dir = _hf_cache()
    for repo in _HF_REPOS:
        snapshots = cache_dir / ("models--" + repo.replace("/", "--")) / "snapshots"
        if snapshots.is_dir():
            for snapshot in sorted(snapshots.iterdir(), reverse=True):
                yield snapshot
                yield from (snapshot / sub for sub in ("tokenizer", "tokenizer_2",
                                                       "tokenizer_3"))


def _comfy_roots(model_path: str) -> Iterator[Path]:
    if model_path:
        yield from Path(os.path.abspath(model_path)).parents
    if os.environ.get("COMFYUI_PATH"):
        yield Path(os.environ["COMFYUI_PATH"])
    yield Path(os.path.expanduser("~")) / "ComfyUI"


def _bpe_file() -> Path | None:
    for package, name in _BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                path = Path(location) / name
                if path.is_file():
                    return path
    return None


def find(kind: str, given: Any = None, model_path: str = "") -> Path:
    """The folder (or, for CLIP, the BPE file) of a ``kind`` tokenizer ("clip" or "t5");
    raises a one-sentence UsageError saying where it looked and what to pass."""
    roots = [Path(os.fspath(given))] if given else []
    if os.environ.get("CKPTKIT_TOKENIZERS"):
        roots.append(Path(os.environ["CKPTKIT_TOKENIZERS"]))
    for root in roots:
        for folder in _candidates(root):
            if _is(kind, folder):
                return folder
    for root in _comfy_roots(model_path):
        for sub in _COMFY[kind]:
            if _is(kind, root / sub):
                return root / sub
    for folder in _hf_folders():
        if _is(kind, folder):
            return folder
    if kind == "clip" and (bpe := _bpe_file()):
        return bpe
    what = ("CLIP tokenizer (a folder with vocab.json and merges.txt, as ComfyUI's "
            "comfy/sd1_tokenizer or openai/clip-vit-large-patch14 has; or pip install "
            "clip-anytorch)" if kind == "clip" else
            "T5 tokenizer (a folder with tokenizer.json, as ComfyUI's "
            "comfy/text_encoders/t5_tokenizer or google/t5-v1_1-xxl has)")
    places = ", ".join([*(str(r) for r in roots), "a ComfyUI install ($COMFYUI_PATH, "
                        "~/ComfyUI, the folders above the model)",
                        f"the Hugging Face cache ({_hf_cache()})"]
                       + (["the clip-anytorch and open_clip packages"] if kind == "clip"
                          else []))
    raise UsageError(f"no {what} was found in {places}; pass its folder with --tokenizers "
                     "DIR (tokenizers= in Python)")


@cache
def _bpe_vocabulary(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """OpenAI's CLIP vocabulary from its BPE merges file, as its SimpleTokenizer builds it:
    the 256 byte symbols, each again with the end-of-word mark, then one token per merge,
    then the start and end tokens (49,408 in all: what vocab.json holds)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:_BPE_MERGES + 1]
    merges = tuple(line for line in lines if line)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which CLIP's BPE is written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _clip(source: Path, pad_with_bang: bool):
    from transformers import CLIPTokenizer

    if source.is_file():
        vocab, merges = _bpe_vocabulary(source)
    else:
        with open(source / "vocab.json", encoding="utf-8") as f:
            vocab = json.load(f)
        with open(source / "merges.txt", encoding="utf-8") as f:
            merges = tuple(line for line in f.read().split("\n")
                           if line and not line.startswith("#version"))
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges],
                         pad_token="!" if pad_with_bang else "<|endoftext|>",
                         model_max_length=_CLIP_LENGTH)


def _t5(source: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(source), local_files_only=True,
                                           model_max_length=_T5_LENGTH)
