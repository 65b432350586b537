"""Quantized weights: the GGML block types, and their dequantization to torch tensors.

A leaf package (it imports nothing else of ckptkit but ``errors``): the format readers use its
type table without torch, and load ``dequant`` (which needs torch) only when a tensor's values
are asked for.
"""
