"""Per-block merge weights: the blocks the community's merge tools name, which block each key
is in, and the weight specs people write (one number, a list, ``NAME=value`` items, a preset).

Why: block-weighted merging ("MBW") is how checkpoints are merged in AUTOMATIC1111 / Forge, and
recipes are shared as lists of 26 (SD1/SD2) or 20 (SDXL) numbers or as preset names. A shared
recipe only means the same thing here if every key falls in the block those tools put it in,
so the rules are theirs, read in their source:

* SD1/SD2 (and the SDXL refiner, whose UNet has the same 12 + 1 + 12 blocks): ``BASE, IN00-IN11,
  M00, OUT00-OUT11``; SDXL: ``BASE, IN00-IN08, M00, OUT00-OUT08``. ``input_blocks.N`` is INnn,
  ``middle_block`` M00, ``output_blocks.N`` OUTnn, ``out`` the last OUT block, ``time_embed``
  (and SDXL's ``label_emb``) IN00. BASE is everything outside the UNet: the text encoder(s)
  *and the VAE*, and any key no rule names. Sources: bbc-mc/sdweb-merge-block-weighted-gui
  ``scripts/mbw/merge_block_weighted.py`` (25 weights, ``time_embed`` -> the first = IN00,
  ``.out.`` -> the last; every other key, text encoder and VAE alike, takes ``base_alpha``, as
  its README says); s1dlx/meh ``sd_meh/merge.py`` (the same); hako-mikan/sd-webui-supermerger
  ``scripts/mergers/mergers.py`` ``blockfromkey`` at 0b1c491 (2025-11): the same for SD1, and
  for SDXL ``conditioner.embedders`` and ``first_stage_model`` -> BASE, ``time_embed`` and
  ``label_emb`` -> IN00. Older supermerger put SD1's ``time_embed`` in OUT11 (``BLOCKID[-2+1]``,
  2023-07 to 2025-11) and left SDXL's unmerged; sd-mecha 1.1.8 puts them in BASE and SDXL's
  VAE in a block of its own (``VAE``), a name supermerger lists (to exclude the VAE) but
  weights with BASE. supermerger takes the refiner (one text encoder) for SD1, whose rules put
  its ``label_emb`` in BASE; we keep it with ``time_embed`` in IN00.
* FLUX.1: ``CLIP, T5, IN, D00-D18, S00-S37, OUT`` (61), supermerger's ``BLOCKIDFLUX`` and
  ``blockfromkey``: ``text_encoders.clip_l`` CLIP, ``text_encoders.t5xxl`` T5, the ``*_in``
  embedders IN, ``double_blocks.N`` Dnn, ``single_blocks.N`` Snn, ``final_layer`` OUT; the
  VAE (and any key no rule names) is not merged by blocks: ``block_of`` answers None and
  ``weights_for_keys`` leaves the key out (keep the first model's tensor).
* SD3/SD3.5: no tool names these blocks (supermerger has no SD3 rules; ComfyUI's
  ``ModelMergeSD3_2B`` weights the key prefixes ``pos_embed``, ``x_embedder``, ``t_embedder``,
  ``y_embedder``, ``context_embedder``, ``joint_blocks.N`` and ``final_layer``). Ours follow
  the FLUX scheme: CLIPL, CLIPG, T5, IN (the five embedders), J00-J23 (J00-J37 for 3.5 Large),
  OUT; the VAE is not merged by blocks.

Keys are recognised in the monolithic naming (``model.diffusion_model.input_blocks.4.1...``,
``cond_stage_model...``, ``conditioner.embedders...``, ``first_stage_model...``,
``text_encoders...``, ``vae...``; kohya's SDXL ``unet.``/``te1.``/``te2.`` too) and in
ComfyUI's bare diffusion-model naming (``input_blocks.4.1...``). supermerger also leaves
alone every key without "weight" or "bias" in its name (CLIP position ids, FLUX's q/k norm
``scale``); that is its merge loop, not its blocks, and is not reproduced here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from typing import NamedTuple

from ..arch.families import DIFFUSION_MODEL, family
from ..arch.keys.flux import FluxConfig
from ..arch.keys.mmdit import MMDiTConfig
from ..arch.keys.unet import UNetConfig
from ..errors import UsageError

BASE = "BASE"
# The order of an SD1/SD2 list (supermerger's BLOCKID; the 25 weights of Merge Block Weighted
# are the same without BASE). Presets are written in it.
MBW_BLOCKS = (BASE, *(f"IN{i:02}" for i in range(12)), "M00",
              *(f"OUT{i:02}" for i in range(12)))

# supermerger's presets, copied from hako-mikan/sd-webui-supermerger
# scripts/mbwpresets_master.txt (0b1c491): 26 values in MBW_BLOCKS order. They are the presets
# of bbc-mc/sdweb-merge-block-weighted-gui csv/preset.tsv (25 values, no BASE) with BASE 0
# prepended (1 for ALL_B). supermerger applies them to SDXL by block name, dropping IN09-IN11
# and OUT09-OUT11 (weighttoxl, slider2text); there are none for FLUX or SD3.
PRESETS: dict[str, tuple[float, ...]] = {
    "GRAD_V": (0, 1, 0.9166666667, 0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5,
        0.4166666667, 0.3333333333, 0.25, 0.1666666667, 0.0833333333, 0, 0.0833333333,
        0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5, 0.5833333333, 0.6666666667, 0.75,
        0.8333333333, 0.9166666667, 1.0),
    "GRAD_A": (0, 0, 0.0833333333, 0.1666666667, 0.25, 0.3333333333, 0.4166666667, 0.5,
        0.5833333333, 0.6666666667, 0.75, 0.8333333333, 0.9166666667, 1.0, 0.9166666667,
        0.8333333333, 0.75, 0.6666666667, 0.5833333333, 0.5, 0.4166666667, 0.3333333333, 0.25,
        0.1666666667, 0.0833333333, 0),
    "FLAT_25": (0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25,
        0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25),
    "FLAT_75": (0, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75,
        0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75),
    "WRAP08": (0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1),
    "WRAP12": (0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1),
    "WRAP14": (0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1),
    "WRAP16": (0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
    "MID12_50": (0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5,
        0.5, 0, 0, 0, 0, 0, 0),
    "OUT07": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1),
    "OUT12": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "OUT12_5": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "RING08_SOFT": (0, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0,
        0, 0),
    "RING08_5": (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0),
    "RING10_5": (0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "RING10_3": (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0),
    "SMOOTHSTEP": (0, 0, 0.00506365740740741, 0.0196759259259259, 0.04296875, 0.0740740740740741,
        0.112123842592593, 0.15625, 0.205584490740741, 0.259259259259259, 0.31640625,
        0.376157407407407, 0.437644675925926, 0.5, 0.562355324074074, 0.623842592592592,
        0.68359375, 0.740740740740741, 0.794415509259259, 0.84375, 0.887876157407408,
        0.925925925925926, 0.95703125, 0.980324074074074, 0.994936342592593, 1),
    "REVERSE-SMOOTHSTEP": (0, 1, 0.994936342592593, 0.980324074074074, 0.95703125,
        0.925925925925926, 0.887876157407407, 0.84375, 0.794415509259259, 0.740740740740741,
        0.68359375, 0.623842592592593, 0.562355324074074, 0.5, 0.437644675925926,
        0.376157407407408, 0.31640625, 0.259259259259259, 0.205584490740741, 0.15625,
        0.112123842592592, 0.0740740740740742, 0.0429687499999996, 0.0196759259259258,
        0.00506365740740744, 0),
    "SMOOTHSTEP*2": (0, 0, 0.0101273148148148, 0.0393518518518519, 0.0859375, 0.148148148148148,
        0.224247685185185, 0.3125, 0.411168981481482, 0.518518518518519, 0.6328125,
        0.752314814814815, 0.875289351851852, 1.0, 0.875289351851852, 0.752314814814815, 0.6328125,
        0.518518518518519, 0.411168981481481, 0.3125, 0.224247685185184, 0.148148148148148,
        0.0859375, 0.0393518518518512, 0.0101273148148153, 0),
    "R_SMOOTHSTEP*2": (0, 1, 0.989872685185185, 0.960648148148148, 0.9140625, 0.851851851851852,
        0.775752314814815, 0.6875, 0.588831018518519, 0.481481481481481, 0.3671875,
        0.247685185185185, 0.124710648148148, 0.0, 0.124710648148148, 0.247685185185185, 0.3671875,
        0.481481481481481, 0.588831018518519, 0.6875, 0.775752314814816, 0.851851851851852,
        0.9140625, 0.960648148148149, 0.989872685185185, 1),
    "SMOOTHSTEP*3": (0, 0, 0.0151909722222222, 0.0590277777777778, 0.12890625, 0.222222222222222,
        0.336371527777778, 0.46875, 0.616753472222222, 0.777777777777778, 0.94921875,
        0.871527777777778, 0.687065972222222, 0.5, 0.312934027777778, 0.128472222222222,
        0.0507812500000004, 0.222222222222222, 0.383246527777778, 0.53125, 0.663628472222223,
        0.777777777777778, 0.87109375, 0.940972222222222, 0.984809027777777, 1),
    "R_SMOOTHSTEP*3": (0, 1, 0.984809027777778, 0.940972222222222, 0.87109375, 0.777777777777778,
        0.663628472222222, 0.53125, 0.383246527777778, 0.222222222222222, 0.05078125,
        0.128472222222222, 0.312934027777778, 0.5, 0.687065972222222, 0.871527777777778,
        0.94921875, 0.777777777777778, 0.616753472222222, 0.46875, 0.336371527777777,
        0.222222222222222, 0.12890625, 0.0590277777777777, 0.0151909722222232, 0),
    "SMOOTHSTEP*4": (0, 0, 0.0202546296296296, 0.0787037037037037, 0.171875, 0.296296296296296,
        0.44849537037037, 0.625, 0.822337962962963, 0.962962962962963, 0.734375, 0.49537037037037,
        0.249421296296296, 0.0, 0.249421296296296, 0.495370370370371, 0.734375000000001,
        0.962962962962963, 0.822337962962962, 0.625, 0.448495370370369, 0.296296296296297,
        0.171875, 0.0787037037037024, 0.0202546296296307, 0),
    "R_SMOOTHSTEP*4": (0, 1, 0.97974537037037, 0.921296296296296, 0.828125, 0.703703703703704,
        0.55150462962963, 0.375, 0.177662037037037, 0.0370370370370372, 0.265625, 0.50462962962963,
        0.750578703703704, 1.0, 0.750578703703704, 0.504629629629629, 0.265624999999999,
        0.0370370370370372, 0.177662037037038, 0.375, 0.551504629629631, 0.703703703703703,
        0.828125, 0.921296296296298, 0.979745370370369, 1),
    "SMOOTHSTEP/2": (0, 0, 0.0196759259259259, 0.0740740740740741, 0.15625, 0.259259259259259,
        0.376157407407407, 0.5, 0.623842592592593, 0.740740740740741, 0.84375, 0.925925925925926,
        0.980324074074074, 1.0, 0.980324074074074, 0.925925925925926, 0.84375, 0.740740740740741,
        0.623842592592593, 0.5, 0.376157407407407, 0.259259259259259, 0.15625, 0.0740740740740741,
        0.0196759259259259, 0),
    "R_SMOOTHSTEP/2": (0, 1, 0.980324074074074, 0.925925925925926, 0.84375, 0.740740740740741,
        0.623842592592593, 0.5, 0.376157407407407, 0.259259259259259, 0.15625, 0.0740740740740742,
        0.0196759259259256, 0.0, 0.0196759259259256, 0.0740740740740742, 0.15625,
        0.259259259259259, 0.376157407407407, 0.5, 0.623842592592593, 0.740740740740741, 0.84375,
        0.925925925925926, 0.980324074074074, 1),
    "SMOOTHSTEP/3": (0, 0, 0.04296875, 0.15625, 0.31640625, 0.5, 0.68359375, 0.84375, 0.95703125,
        1.0, 0.95703125, 0.84375, 0.68359375, 0.5, 0.31640625, 0.15625, 0.04296875, 0.0,
        0.04296875, 0.15625, 0.31640625, 0.5, 0.68359375, 0.84375, 0.95703125, 1),
    "R_SMOOTHSTEP/3": (0, 1, 0.95703125, 0.84375, 0.68359375, 0.5, 0.31640625, 0.15625, 0.04296875,
        0.0, 0.04296875, 0.15625, 0.31640625, 0.5, 0.68359375, 0.84375, 0.95703125, 1.0,
        0.95703125, 0.84375, 0.68359375, 0.5, 0.31640625, 0.15625, 0.04296875, 0),
    "SMOOTHSTEP/4": (0, 0, 0.0740740740740741, 0.259259259259259, 0.5, 0.740740740740741,
        0.925925925925926, 1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259,
        0.0740740740740741, 0.0, 0.0740740740740741, 0.259259259259259, 0.5, 0.740740740740741,
        0.925925925925926, 1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259,
        0.0740740740740741, 0),
    "R_SMOOTHSTEP/4": (0, 1, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259,
        0.0740740740740742, 0.0, 0.0740740740740742, 0.259259259259259, 0.5, 0.740740740740741,
        0.925925925925926, 1.0, 0.925925925925926, 0.740740740740741, 0.5, 0.259259259259259,
        0.0740740740740742, 0.0, 0.0740740740740742, 0.259259259259259, 0.5, 0.740740740740741,
        0.925925925925926, 1),
    "COSINE": (0, 1, 0.995722430686905, 0.982962913144534, 0.961939766255643, 0.933012701892219,
        0.896676670145617, 0.853553390593274, 0.80438071450436, 0.75, 0.691341716182545,
        0.62940952255126, 0.565263096110026, 0.5, 0.434736903889974, 0.37059047744874,
        0.308658283817455, 0.25, 0.195619285495639, 0.146446609406726, 0.103323329854382,
        0.0669872981077805, 0.0380602337443566, 0.0170370868554658, 0.00427756931309475, 0),
    "REVERSE_COSINE": (0, 0, 0.00427756931309475, 0.0170370868554659, 0.0380602337443566,
        0.0669872981077808, 0.103323329854383, 0.146446609406726, 0.19561928549564, 0.25,
        0.308658283817455, 0.37059047744874, 0.434736903889974, 0.5, 0.565263096110026,
        0.62940952255126, 0.691341716182545, 0.75, 0.804380714504361, 0.853553390593274,
        0.896676670145618, 0.933012701892219, 0.961939766255643, 0.982962913144534,
        0.995722430686905, 1),
    "TRUE_CUBIC_HERMITE": (0, 0, 0.199031876929012, 0.325761959876543, 0.424641927083333,
        0.498456790123457, 0.549991560570988, 0.58203125, 0.597360869984568, 0.598765432098765,
        0.589029947916667, 0.570939429012346, 0.547278886959876, 0.520833333333333,
        0.49438777970679, 0.470727237654321, 0.45263671875, 0.442901234567901, 0.444305796682099,
        0.459635416666667, 0.491675106095678, 0.543209876543211, 0.617024739583333,
        0.715904706790124, 0.842634789737655, 1),
    "TRUE_REVERSE_CUBIC_HERMITE": (0, 1, 0.800968123070988, 0.674238040123457, 0.575358072916667,
        0.501543209876543, 0.450008439429012, 0.41796875, 0.402639130015432, 0.401234567901235,
        0.410970052083333, 0.429060570987654, 0.452721113040124, 0.479166666666667,
        0.50561222029321, 0.529272762345679, 0.54736328125, 0.557098765432099, 0.555694203317901,
        0.540364583333333, 0.508324893904322, 0.456790123456789, 0.382975260416667,
        0.284095293209876, 0.157365210262345, 0),
    "FAKE_CUBIC_HERMITE": (0, 0, 0.157576195987654, 0.28491512345679, 0.384765625,
        0.459876543209877, 0.512996720679012, 0.546875, 0.564260223765432, 0.567901234567901,
        0.560546875, 0.544945987654321, 0.523847415123457, 0.5, 0.476152584876543,
        0.455054012345679, 0.439453125, 0.432098765432099, 0.435739776234568, 0.453125,
        0.487003279320987, 0.540123456790124, 0.615234375, 0.71508487654321, 0.842423804012347, 1),
    "FAKE_REVERSE_CUBIC_HERMITE": (0, 1, 0.842423804012346, 0.71508487654321, 0.615234375,
        0.540123456790123, 0.487003279320988, 0.453125, 0.435739776234568, 0.432098765432099,
        0.439453125, 0.455054012345679, 0.476152584876543, 0.5, 0.523847415123457,
        0.544945987654321, 0.560546875, 0.567901234567901, 0.564260223765432, 0.546875,
        0.512996720679013, 0.459876543209876, 0.384765625, 0.28491512345679, 0.157576195987653, 0),
    "ALL_A": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "ALL_B": (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
}


class BlockInfo(NamedTuple):
    """One line of ``describe``: a block (None: keys block merging leaves alone), the key
    prefixes it covers and how many keys."""

    block: str | None
    prefixes: tuple[str, ...]
    n_keys: int


@dataclass(frozen=True)
class _Scheme:
    """How one architecture is cut into blocks."""

    names: tuple[str, ...]
    components: dict[str, str | None]  # text encoder / VAE component -> its block
    fixed: dict[str, str]  # first name segment of a diffusion-model key -> its block
    numbered: dict[str, str]  # first segment of "<segment>.<N>...." -> block prefix
    fallback: str | None  # a key no rule names

    def diffusion_block(self, rest: str) -> str | None:
        head, _, tail = rest.partition(".")
        if head in self.numbered:
            index = tail.partition(".")[0]
            name = f"{self.numbered[head]}{int(index):02}" if index.isdigit() else None
            return name if name in self.names else self.fallback
        return self.fixed.get(head, self.fallback)

    def heads(self) -> set[str]:
        return {*self.fixed, *self.numbered}


def _numbered(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:02}" for i in range(count)]


def _unet_scheme(cfg: UNetConfig, others: Iterable[str]) -> _Scheme:
    levels = len(cfg.channel_mult)
    inputs = 1 + levels * cfg.num_res_blocks + levels - 1  # stem + res blocks + downsamplers
    outputs = levels * (cfg.num_res_blocks + 1)
    names = (BASE, *_numbered("IN", inputs), "M00", *_numbered("OUT", outputs))
    fixed = {"time_embed": "IN00", "label_emb": "IN00", "middle_block": "M00", "out": names[-1]}
    return _Scheme(names, dict.fromkeys(others, BASE), fixed,
                   {"input_blocks": "IN", "output_blocks": "OUT"}, BASE)


def _flux_scheme(cfg: FluxConfig) -> _Scheme:
    names = ("CLIP", "T5", "IN", *_numbered("D", cfg.depth), *_numbered("S", cfg.depth_single),
             "OUT")
    embedders = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
    return _Scheme(names, {"clip_l": "CLIP", "t5xxl": "T5", "vae": None},
                   {**dict.fromkeys(embedders, "IN"), "final_layer": "OUT"},
                   {"double_blocks": "D", "single_blocks": "S"}, None)


def _mmdit_scheme(cfg: MMDiTConfig) -> _Scheme:
    names = ("CLIPL", "CLIPG", "T5", "IN", *_numbered("J", cfg.depth), "OUT")
    embedders = ("pos_embed", "x_embedder", "t_embedder", "y_embedder", "context_embedder")
    return _Scheme(names, {"clip_l": "CLIPL", "clip_g": "CLIPG", "t5xxl": "T5", "vae": None},
                   {**dict.fromkeys(embedders, "IN"), "final_layer": "OUT"},
                   {"joint_blocks": "J"}, None)


@cache
def _scheme(family_id: str) -> _Scheme:
    fam = family(family_id)
    cfg = fam.component(DIFFUSION_MODEL).full
    if isinstance(cfg, UNetConfig):
        return _unet_scheme(cfg, (n for n in fam.component_names if n != DIFFUSION_MODEL))
    if isinstance(cfg, FluxConfig):
        return _flux_scheme(cfg)
    if isinstance(cfg, MMDiTConfig):
        return _mmdit_scheme(cfg)
    raise UsageError(f"{fam.name} has no blocks to weight")


@cache
def _prefixes(family_id: str) -> tuple[tuple[str, str], ...]:
    """(component, prefix) of the monolithic and kohya layouts, longest prefix first."""
    pairs = {(c.name, prefix) for c in family(family_id).components
             for prefix in (c.ldm_prefix, c.kohya_prefix) if prefix}
    return tuple(sorted(pairs, key=lambda p: (-len(p[1]), p[1])))


def _locate(family_id: str, key: str) -> tuple[str | None, str]:
    """The component a key belongs to (None: unknown) and the key without its prefix."""
    for name, prefix in _prefixes(family_id):
        if key.startswith(prefix):
            return name, key[len(prefix):]
    if key.partition(".")[0] in _scheme(family_id).heads():
        return DIFFUSION_MODEL, key  # ComfyUI's bare diffusion-model naming
    return None, key


def block_names(family_id: str) -> list[str]:
    """The blocks of a family in the order a positional list of weights follows."""
    return list(_scheme(family_id).names)


def block_of(family_id: str, key: str) -> str | None:
    """The block ``key`` is weighted by; None for keys block merging leaves alone (the FLUX
    and SD3 VAE, unknown FLUX/SD3 keys)."""
    scheme = _scheme(family_id)
    component, rest = _locate(family_id, key)
    if component == DIFFUSION_MODEL:
        return scheme.diffusion_block(rest)
    if component is None:
        return scheme.fallback
    return scheme.components[component]


def weights_for_keys(family_id: str, keys: Iterable[str], spec: str, default: float
                     ) -> dict[str, float]:
    """Each key's weight under ``spec``; blocks the spec does not set get ``default``. Keys
    block merging leaves alone are left out: the merge keeps the first model's tensor."""
    values = parse_weights(spec, family_id)
    weights = {}
    for key in keys:
        block = block_of(family_id, key)
        if block is not None:
            weights[key] = values.get(block, default)
    return weights


def describe(family_id: str, keys: Iterable[str] | None = None) -> list[BlockInfo]:
    """Every block with the key prefixes and number of keys it covers, in list order, then
    (block None) the keys no block covers; of ``keys``, or else of the family's full-size
    monolithic checkpoint."""
    if keys is None:
        keys = (k for c in family(family_id).components for k in c.keys(layout="ldm"))
    groups: dict[str | None, dict[str, int]] = {name: {} for name in block_names(family_id)}
    for key in keys:
        counts = groups.setdefault(block_of(family_id, key), {})
        prefix = _group(family_id, key)
        counts[prefix] = counts.get(prefix, 0) + 1
    return [BlockInfo(block, tuple(counts), sum(counts.values()))
            for block, counts in groups.items() if counts]


def _group(family_id: str, key: str) -> str:
    """The prefix ``describe`` lists a key under: its component, or its diffusion-model
    part (``model.diffusion_model.input_blocks.4``), or its first name segment if unknown."""
    component, rest = _locate(family_id, key)
    if component is None:
        return key.partition(".")[0]
    outer = key[:len(key) - len(rest)]
    if component != DIFFUSION_MODEL:
        return outer.rstrip(".")
    head, _, tail = rest.partition(".")
    index = tail.partition(".")[0]
    numbered = head in _scheme(family_id).numbered and index.isdigit()
    return f"{outer}{head}.{index}" if numbered else f"{outer}{head}"


def parse_weights(spec: str, family_id: str) -> dict[str, float]:
    """The block weights ``spec`` sets: one number (every block); a comma list of one number
    per block (see ``_list_forms`` for the lengths accepted); or comma-separated items, each
    ``NAME=value`` (NAME may be a glob: ``OUT*=1``) or a preset name, later items overriding
    earlier ones. Blocks a spec does not set are absent (the caller's default)."""
    items = [item.strip() for item in spec.split(",")]
    numbers = [_number(item) for item in items]
    if None not in numbers:
        if len(numbers) == 1:
            return dict.fromkeys(block_names(family_id), numbers[0])
        return _positional(numbers, family_id)
    weights: dict[str, float] = {}
    for item in items:
        weights.update(_item(item, family_id))
    return weights


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _list_forms(family_id: str) -> list[tuple[str, ...]]:
    """The block orders a positional list may follow: the family's own, the same without
    BASE (Merge Block Weighted's 25, whose base_alpha is the caller's default here), and for
    SDXL an SD1 list, keeping the blocks SDXL has as supermerger's weighttoxl does."""
    names = tuple(block_names(family_id))
    forms = [names]
    if names[0] == BASE:
        forms.append(names[1:])
    if set(names) < set(MBW_BLOCKS):
        forms += [MBW_BLOCKS, MBW_BLOCKS[1:]]
    return forms


def _positional(numbers: list[float], family_id: str) -> dict[str, float]:
    names = set(block_names(family_id))
    forms = _list_forms(family_id)
    for form in forms:
        if len(form) == len(numbers):
            return {n: v for n, v in zip(form, numbers, strict=True) if n in names}
    expected = " or ".join(f"{len(form)} ({_span(form)})" for form in forms)
    raise UsageError(f"{len(numbers)} block weights given, but {family(family_id).name} "
                     f"takes {expected}")


def _item(item: str, family_id: str) -> dict[str, float]:
    """One item of a spec that is not a plain list: ``NAME=value`` or a preset name."""
    if "=" in item:
        return _assignment(item, family_id)
    if item.upper() in PRESETS:
        return _preset(item.upper(), family_id)
    if _number(item) is not None:
        raise UsageError(f"block weight {item}: a bare number must stand alone or in a full "
                         f"list; write *={item} to set every block")
    if not item:
        raise UsageError("the block weights are empty or have an empty item (a stray comma?)")
    raise UsageError(f"block weight {item!r} is neither NAME=value nor a preset "
                     f"({', '.join(PRESETS)})")


def _assignment(item: str, family_id: str) -> dict[str, float]:
    pattern, _, text = (part.strip() for part in item.partition("="))
    value = _number(text)
    if value is None:
        raise UsageError(f"block weight {item!r}: {text!r} is not a number")
    names = block_names(family_id)
    matched = [n for n in names if fnmatchcase(n, pattern.upper())]
    if not matched:
        raise UsageError(f"block weight {item!r}: {family(family_id).name} has no block "
                         f"{pattern!r} (its blocks: {_span(names)})")
    return dict.fromkeys(matched, value)


def _preset(name: str, family_id: str) -> dict[str, float]:
    names = block_names(family_id)
    if not set(names) <= set(MBW_BLOCKS):
        raise UsageError(f"preset {name} is for SD 1.x/2.x and SDXL blocks; "
                         f"{family(family_id).name} has no presets")
    return {n: float(v) for n, v in zip(MBW_BLOCKS, PRESETS[name], strict=True) if n in names}


def _span(names: Iterable[str]) -> str:
    """``BASE, IN00-IN11, M00, ...``: names with runs of consecutive numbers collapsed."""
    runs: list[list[str]] = []
    for name in names:
        if runs and _follows(runs[-1][-1], name):
            runs[-1].append(name)
        else:
            runs.append([name])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _follows(a: str, b: str) -> bool:
    stem_a, stem_b = a.rstrip("0123456789"), b.rstrip("0123456789")
    return (stem_a == stem_b and a != stem_a and b != stem_b
            and int(b[len(stem_b):]) == int(a[len(stem_a):]) + 1)
