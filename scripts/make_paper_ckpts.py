"""Tiny Lightning checkpoints in the layout of the paper's reference code (CompVis/fm-boosting),
for the tests of loading `.ckpt` files directly (models/tests/paper_ckpt.rs).

    /work/venv/bin/python scripts/make_paper_ckpts.py    # torch and safetensors, from PyPI

The reference trainer (`TrainerFMBoost`, a LightningModule) holds the flow model as `model`
(its network as `model.net`), the EMA copy as `ema_model` (`ema_model.ema_model.net`, with
`initted` / `step` buffers) and the frozen first stage (`first_stage`, the LDM kl-f8
autoencoder: `encoder.down.0.block.0…`, `quant_conv`, …). `trainer.save_checkpoint` writes a
zip pickle: {"epoch", "global_step", "pytorch-lightning_version", "state_dict",
"optimizer_states", "lr_schedulers", "callbacks", "hyper_parameters"}. This writes that
structure with torch.save — hyper-parameters a plain dict, as Lightning's dump makes it, with
an object among its values, as OmegaConf configs pickle — around tiny networks:

- `model.net` / `ema_model.ema_model.net`: the EfficientUNet of scripts/bench/torch_efficient_unet.py
  (the reference's state-dict names) at the smallest config GroupNorm allows, online and EMA
  weights different;
- `first_stage`: an LDM autoencoder of one level (names as diffusers' AutoencoderKL converted
  by scripts/sd15_single_file.py's mapping, which diffusers' from_single_file checks).

To stay a few KB, every tensor is a window of one random float16 storage (torch saves a
storage once, however many tensors view it; windows at offsets, as candle reads them). The
reference file beside it holds that storage as plain safetensors plus, in its metadata, every
key's (offset, shape) and the configs, so the test rebuilds the expected tensors without
reading any pickle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))
from torch_efficient_unet import EfficientUNet  # noqa: E402
from sd15_single_file import vae_to_ldm  # noqa: E402

OUT = ROOT / "models" / "tests" / "data"
CFM_CONFIG = {
    "in_channels": 8, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1, "attention_resolutions": [],
    "channel_mult": [1], "dim_head": 8, "num_heads": 4, "use_linear_attn": False, "use_scale_shift_norm": True,
    "conv_resample": True, "dropout": 0.0,
}
# Window i of a network starts at its base + STRIDE·i; bases differ so online and EMA differ.
STRIDE = 8
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


class NodeConfig:
    """Stands in for an OmegaConf node: an object pickled with its __dict__ (BUILD)."""

    def __init__(self, **content):
        self.content = content


def windows(storage: torch.Tensor, shapes: dict[str, list[int]], start: int, layout: dict) -> dict[str, torch.Tensor]:
    """Tensors of `shapes` as distinct contiguous windows of `storage`, from offset `start`."""
    out = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        numel = int(torch.tensor(shape).prod()) if shape else 1
        offset = start + STRIDE * i
        out[key] = storage[offset: offset + numel].view(shape)
        layout[key] = [offset, shape]
    return out


def main() -> int:
    from diffusers import AutoencoderKL

    g = torch.Generator().manual_seed(13)
    layout: dict[str, list] = {}
    net_shapes = {k: list(v.shape) for k, v in EfficientUNet.from_config(CFM_CONFIG).state_dict().items()}
    ae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32,), layers_per_block=1, latent_channels=4,
                       norm_num_groups=32, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    ae_shapes = {}
    for key, t in ae.state_dict().items():
        ldm = vae_to_ldm(key, 1)
        shape = list(t.shape)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and len(shape) == 2:
            shape += [1, 1]
        ae_shapes["first_stage." + ldm] = shape

    all_shapes = {**{"model.net." + k: s for k, s in net_shapes.items()}, **ae_shapes}
    biggest = max(int(torch.tensor(s).prod()) for s in all_shapes.values())
    # float16, as most released checkpoints are; one storage for every tensor.
    storage = (torch.randn(biggest + STRIDE * len(all_shapes) + 8, generator=g) * 0.1).half()
    online_t = windows(storage, {"model.net." + k: s for k, s in net_shapes.items()}, 0, layout)
    ema_t = windows(storage, {"ema_model.ema_model.net." + k: s for k, s in net_shapes.items()}, 4, layout)
    first_t = windows(storage, ae_shapes, 2, layout)
    state_dict = {**online_t, **ema_t, "ema_model.initted": torch.tensor(True), "ema_model.step": torch.tensor(1200), **first_t}

    # Lightning saves `dict(model.hparams)` (a plain dict); values may be config objects.
    hparams = dict(
        fm_cfg=NodeConfig(target="fmboost.flow.FlowModel", params={"net_cfg": {"params": CFM_CONFIG}}),
        first_stage_cfg={"target": "fmboost.kl_autoencoder.AutoencoderKL", "params": {"ddconfig": DDCONFIG}},
        low_res_size=32, upsampling_mode="bilinear", noising_step=400, concat_context=True, scale_factor=0.18215,
        lr=1e-4, ema_rate=0.99, use_ema_for_sampling=True, metric_tracker_cfg=None)
    exp_avg = torch.zeros(3)
    checkpoint = {
        "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.2.1",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "logs/ckpts"}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(1200.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    ckpt = OUT / "paper_lightning_tiny.ckpt"
    torch.save(checkpoint, ckpt)
    reference = OUT / "paper_lightning_tiny.reference.safetensors"
    save_file({"storage": storage}, str(reference), metadata={
        "description": "expected tensors of paper_lightning_tiny.ckpt: each state_dict key is storage[offset:][:numel] "
                       "viewed as shape, layout[key] = [offset, shape]; "
                       "written by scripts/make_paper_ckpts.py",
        "layout": json.dumps(layout), "cfm_config": json.dumps(CFM_CONFIG), "ddconfig": json.dumps(DDCONFIG)})
    print(f"wrote {ckpt} ({ckpt.stat().st_size} bytes) and {reference} ({reference.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
