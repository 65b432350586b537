"""Tiny CLIP and T5 tokenizers written by the tests, so that loading and generating need no
download: a CLIP BPE vocabulary of the 256 byte symbols (and their end-of-word forms), a few
merges and the two special tokens, end token last (CLIP pools at the highest id); and a
T5-style Unigram (SentencePiece) ``tokenizer.json`` made with the ``tokenizers`` library."""

from __future__ import annotations

import json
from pathlib import Path

from ckptkit.ops.tokenizers import _bytes_to_unicode

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o n</w>"]
T5_WORDS = ["▁a", "▁cat", "▁dog", "▁the", "▁on", "▁photo", "▁of", "▁red", "▁blue"]


def write_clip(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return folder


def write_t5(folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(w, -1.0) for w in T5_WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0,
         "tokenizer_class": "T5Tokenizer"}))
    return folder


def write_all(root: Path) -> Path:
    write_clip(root / "clip")
    write_t5(root / "t5")
    return root
