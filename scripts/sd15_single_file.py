"""Reference data for single-file SD 1.x checkpoints (the CompVis / A1111 layout).

Run by hand with the project's reference venv when ../shared/fixtures/sd15-tiny-diffusers
changes (diffusers, torch, safetensors):

    /work/venv/bin/python scripts/sd15_single_file.py [--fixture DIR] [--out FILE]

1. Writes the fixture's UNet, VAE and text encoder as one single file, in a temporary
   directory, by the inverse of the LDM → diffusers renaming (plus the non-weight keys real
   SD 1.5 files carry: DDPM schedule buffers and CLIP's position ids).
2. Loads that file back with diffusers' own `StableDiffusionPipeline.from_single_file(path,
   config=fixture)` and checks that every tensor of every component equals the fixture's,
   bit for bit, and that no fixture tensor is left unfilled. Only then:
3. Writes the key mapping diffusers used (read off the loaded tensors by value, so it is
   diffusers' mapping, not this script's) to models/tests/data/sd15_tiny_single_file_keys.json.

The Rust test (models/tests/sd_single_file.rs) builds the single file from the fixture with
that JSON — not with the Rust loader's own inverse — and checks the Rust loader reads it
back to the fixture's networks. No weights are committed: the fixture is the source.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE = ROOT.parent / "shared" / "fixtures" / "sd15-tiny-diffusers"
DEFAULT_OUT = ROOT / "models" / "tests" / "data" / "sd15_tiny_single_file_keys.json"

SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev"]


def resnet_to_ldm(rest: str) -> str:
    for new, old in [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(key: str, layers: int, attn_levels_up: set[int]) -> str:
    p = key.split(".")
    simple = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module = key.rsplit(".", 1)[0]
    if module in simple:
        return simple[module] + "." + p[-1]
    per = layers + 1
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{1 + b * per + layers}.0.op.{p[-1]}"
        l = int(p[3])
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"input_blocks.{1 + b * per + l}.0.{resnet_to_ldm(rest)}"
        return f"input_blocks.{1 + b * per + l}.1.{rest}"
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if p[2] == '0' else 2}.{resnet_to_ldm(rest)}"
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":
            return f"output_blocks.{b * per + layers}.{2 if b in attn_levels_up else 1}.conv.{p[-1]}"
        l = int(p[3])
        rest = ".".join(p[4:])
        if p[2] == "resnets":
            return f"output_blocks.{b * per + l}.0.{resnet_to_ldm(rest)}"
        return f"output_blocks.{b * per + l}.1.{rest}"
    raise KeyError(key)


def vae_to_ldm(key: str, levels: int) -> str:
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = p[0], p[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{rest[-1]}"
    def res(r):
        return ".".join(["nin_shortcut" if r[0] == "conv_shortcut" else r[0]] + r[1:])
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}.{res(rest[3:])}"
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
        return f"{side}.mid.attn_1.{name}.{rest[-1]}"
    if rest[0] == "down_blocks":
        if rest[2] == "downsamplers":
            return f"{side}.down.{rest[1]}.downsample.conv.{rest[-1]}"
        return f"{side}.down.{rest[1]}.block.{rest[3]}.{res(rest[4:])}"
    if rest[0] == "up_blocks":
        level = levels - 1 - int(rest[1])
        if rest[2] == "upsamplers":
            return f"{side}.up.{level}.upsample.conv.{rest[-1]}"
        return f"{side}.up.{level}.block.{rest[3]}.{res(rest[4:])}"
    raise KeyError(key)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    fixture = args.fixture.resolve()

    import diffusers
    from diffusers import StableDiffusionPipeline

    unet_cfg = json.loads((fixture / "unet/config.json").read_text())
    vae_cfg = json.loads((fixture / "vae/config.json").read_text())
    parts = {
        "unet": load_file(fixture / "unet/diffusion_pytorch_model.safetensors"),
        "vae": load_file(fixture / "vae/diffusion_pytorch_model.safetensors"),
        "text_encoder": load_file(fixture / "text_encoder/model.safetensors"),
    }
    layers = unet_cfg["layers_per_block"]
    n = len(unet_cfg["block_out_channels"])
    attn_up = {i for i, t in enumerate(unet_cfg["up_block_types"]) if t.startswith("CrossAttn")}
    levels = len(vae_cfg["block_out_channels"])

    single: dict[str, torch.Tensor] = {}
    for key, t in parts["unet"].items():
        single["model.diffusion_model." + unet_to_ldm(key, layers, attn_up)] = t
    for key, t in parts["vae"].items():
        ldm = vae_to_ldm(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and t.dim() == 2:
            t = t.reshape(*t.shape, 1, 1)  # LDM's attention projections are 1x1 convs
        single["first_stage_model." + ldm] = t
    for key, t in parts["text_encoder"].items():
        key = key if key.startswith("text_model.") else "text_model." + key
        single["cond_stage_model.transformer." + key] = t
    extra = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None]}
    for name in SCHEDULE_BUFFERS:
        extra[name] = torch.linspace(0.0, 1.0, 1000)
    assert len(single) == sum(len(p) for p in parts.values()), "two fixture tensors mapped to one key"

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15-tiny-single.safetensors"
        save_file({**single, **extra}, str(path))
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(fixture), local_files_only=True, safety_checker=None, requires_safety_checker=False)

    by_digest: dict[str, list[str]] = {}
    for key, t in single.items():
        by_digest.setdefault(digest(t), []).append(key)
    keys = []
    failures = []
    for component in ("unet", "vae", "text_encoder"):
        loaded = getattr(pipe, component).state_dict()
        for name, t in parts[component].items():
            name_loaded = name
            if component == "text_encoder" and name not in loaded:
                name_loaded = "text_model." + name
            got = loaded.get(name_loaded)
            if got is None:
                failures.append(f"{component}.{name}: not loaded by from_single_file")
                continue
            if not torch.equal(got.float().reshape(t.shape), t.float()):
                failures.append(f"{component}.{name}: from_single_file loaded different values")
                continue
            sources = by_digest.get(digest(got.reshape(t.shape)), [])
            if len(sources) != 1:
                failures.append(f"{component}.{name}: {len(sources)} single-file keys hold its values (need exactly one)")
                continue
            keys.append({"single": sources[0], "component": component, "diffusers": name,
                         "shape": list(single[sources[0]].shape)})
    if failures:
        print("from_single_file did not load the fixture back:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1

    keys.sort(key=lambda k: k["single"])
    out = {
        "description": "The key mapping diffusers' from_single_file(config=fixture) applied to a single-file SD 1.x "
                       "checkpoint made from the fixture (every tensor checked equal); written by scripts/sd15_single_file.py",
        "diffusers_version": diffusers.__version__,
        "fixture": fixture.name,
        "keys": keys,
        "extra": [{"single": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in extra.items()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One key a line: small, and diffs show what a fixture change moved.
    text = json.dumps({k: v for k, v in out.items() if k not in ("keys", "extra")}, indent=1)[:-2]
    for field in ("keys", "extra"):
        rows = ",\n  ".join(json.dumps(row) for row in out[field])
        text += f',\n "{field}": [\n  {rows}\n ]'
    args.out.write_text(text + "\n}\n")
    json.loads(args.out.read_text())
    print(f"{len(keys)} keys checked against diffusers {diffusers.__version__}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
