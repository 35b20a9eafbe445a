#!/usr/bin/env python3
"""Checks torch_efficient_unet.EfficientUNet against the shared golden vectors.

For each cfm_unet_*.safetensors file: build the network from the `config` JSON in the file's
metadata, load the `net.*` weights with load_state_dict(strict=True), run
net(x, t, context) on the stored inputs and compare with `output.v`. Passes when the relative
error ‖ours − ref‖ / ‖ref‖ is ≤ 1e-4 for every file (the tolerance of shared/golden/README.md);
exits 1 otherwise.

Golden directory: $FMBOOST_GOLDEN_DIR, else <repo>/../shared/golden (as scripts/test.sh).
Needs only torch and numpy (safetensors is parsed here, no `safetensors` package).

    /usr/bin/python3 scripts/bench/check_torch_unet.py
"""

import json
import os
import struct
import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from torch_efficient_unet import PAPER_CONFIG, EfficientUNet, has_sdpa  # noqa: E402

FILES = [
    "cfm_unet_a.safetensors",
    "cfm_unet_b_linear_nonsquare.safetensors",
    "cfm_unet_c_noscaleshift_noconvresample.safetensors",
]
TOLERANCE = 1e-4
DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    """(tensors as numpy arrays, metadata dict) of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    metadata = header.pop("__metadata__", {}) or {}
    body = data[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not handled")
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
        tensors[name] = array.reshape(info["shape"]).astype(DTYPES[info["dtype"]])
    return tensors, metadata


def golden_dir():
    env = os.environ.get("FMBOOST_GOLDEN_DIR")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(os.path.dirname(repo), "shared", "golden")


def check_file(path):
    tensors, metadata = read_safetensors(path)
    config = json.loads(metadata["config"])
    net = EfficientUNet.from_config(config).eval()
    state = {k[len("net."):]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        x = torch.from_numpy(tensors["input.x"].copy())
        t = torch.from_numpy(tensors["input.t"].copy())
        context = torch.from_numpy(tensors["input.context"].copy())
        v = net(x, t, context).double()
    ref = torch.from_numpy(tensors["output.v"].copy()).double()
    if v.shape != ref.shape:
        return float("inf"), f"shape {tuple(v.shape)} != {tuple(ref.shape)}"
    if not torch.isfinite(v).all():
        return float("inf"), "non-finite output"
    rel = ((v - ref).norm() / ref.norm()).item()
    max_abs = (v - ref).abs().max().item()
    n_params = sum(p.numel() for p in net.parameters())
    return rel, f"{len(state)} tensors, {n_params} params, max |diff| {max_abs:.3e}"


def paper_param_count():
    """Parameters of the paper config, built without initialising the weights (the untouched
    storage is never paged in), to compare with the Rust port's 306 M."""
    inits = {name: getattr(torch.nn.init, name) for name in ("kaiming_uniform_", "uniform_")}
    try:
        for name in inits:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        net = EfficientUNet.from_config(PAPER_CONFIG)
    finally:
        for name, fn in inits.items():
            setattr(torch.nn.init, name, fn)
    return sum(p.numel() for p in net.parameters())


def main():
    torch.set_num_threads(1)
    directory = golden_dir()
    print(f"torch {torch.__version__}, sdpa {'yes' if has_sdpa() else 'no (explicit softmax fallback)'}, golden {directory}")
    ok = True
    for name in FILES:
        path = os.path.join(directory, name)
        try:
            rel, detail = check_file(path)
        except Exception as e:  # a missing key, a wrong shape, an unreadable file: fail loudly
            rel, detail = float("inf"), f"{type(e).__name__}: {e}"
        passed = rel <= TOLERANCE
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: rel error {rel:.3e} (tolerance {TOLERANCE:g}); {detail}")
    n = paper_param_count()
    print(f"paper config: {n} parameters ({n / 1e6:.1f} M; the Rust port counts 305-307 M)")
    print("all golden checks passed" if ok else "golden check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
