#!/usr/bin/env python3
"""Writes models/tests/data/pytorch_tensors.bin: a tiny PyTorch zip pickle (torch.save) for the
test of reading `.bin` weights without executing code (models/tests/sd_fixtures.rs).

The values are closed-form so the Rust test states them without reading anything else. Run by
hand with any torch >= 1.6 when the test's expectations change:

    python3 scripts/make-pickle-testdata.py
"""
import collections
import pathlib

import torch

out = pathlib.Path(__file__).resolve().parent.parent / "models/tests/data/pytorch_tensors.bin"
base = torch.arange(10, dtype=torch.float32)
state = collections.OrderedDict(
    [
        ("f32", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
        ("f16", torch.arange(4, dtype=torch.float16) * 0.5),
        ("bf16", torch.arange(4, dtype=torch.bfloat16) * 0.25),
        ("i64", torch.arange(5, dtype=torch.int64)),
        # A view into a larger storage: saved with the whole storage and an offset of 4.
        ("view", base[4:8]),
        # Column-major (a transpose): saved with its strides.
        ("transposed", torch.arange(6, dtype=torch.float32).reshape(2, 3).t()),
        ("text_model.embeddings.position_ids", torch.arange(3, dtype=torch.int64)[None]),
    ]
)
torch.save(state, out)
print(f"wrote {out} ({out.stat().st_size} bytes)")
