"""Parameter sets with real model shapes, built from the architectures (no download).

Each set is a list of shapes, one per parameter tensor, in the model's
``named_parameters()`` order. The counts are checked in the tests and below,
so a typo in an architecture shows up as a wrong total rather than a quietly
different benchmark.
"""
from __future__ import annotations

import math

Shape = tuple[int, ...]


def resnet50() -> list[Shape]:
    """torchvision's ``resnet50()``: 161 tensors, 25,557,032 parameters."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + its BatchNorm
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = width * 4  # bottleneck expansion
        for b in range(blocks):
            shapes += [
                (width, in_ch, 1, 1), (width,), (width,),
                (width, width, 3, 3), (width,), (width,),
                (out_ch, width, 1, 1), (out_ch,), (out_ch,),
            ]
            if b == 0:  # projection shortcut of each stage's first block
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def gpt2_124m() -> list[Shape]:
    """HuggingFace ``GPT2Model`` (gpt2, lm_head tied): 148 tensors, 124,439,808 parameters."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn (Conv1D: in x out)
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def llama_1b() -> list[Shape]:
    """TinyLlama-1.1B (Llama-2 architecture, grouped-query attention):
    201 tensors, 1,100,048,384 parameters."""
    d, vocab, ffn, layers, heads, kv_heads = 2048, 32000, 5632, 22, 32, 4
    kv = d // heads * kv_heads
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [
            (d, d), (kv, d), (kv, d), (d, d),  # q, k, v, o projections
            (ffn, d), (ffn, d), (d, ffn),  # gate, up, down
            (d,), (d,),  # input / post-attention RMSNorm
        ]
    shapes += [(d,), (vocab, d)]  # final norm, untied lm_head
    return shapes


def small_tensors(count: int = 5000, numel: int = 4096) -> list[Shape]:
    """Many small tensors: the launch-bound case (5,000 x 4,096 = 20,480,000 parameters)."""
    return [(numel,)] * count


def tiny() -> list[Shape]:
    """A few odd-sized tensors for smoke tests (not a real model)."""
    return [(7, 5), (33,), (1,), (64, 3, 3, 3), (1000,)]


SETS = {
    "resnet50": resnet50,
    "gpt2": gpt2_124m,
    "llama1b": llama_1b,
    "small": small_tensors,
    "tiny": tiny,
}

# documented sizes, checked by the tests: (tensors, parameters)
EXPECTED = {
    "resnet50": (161, 25_557_032),
    "gpt2": (148, 124_439_808),
    "llama1b": (201, 1_100_048_384),
    "small": (5000, 20_480_000),
}


def get(name: str) -> list[Shape]:
    if name not in SETS:
        raise ValueError(f"parameter set must be one of {sorted(SETS)}, got {name!r}")
    return SETS[name]()


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)
