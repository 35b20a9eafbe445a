#!/usr/bin/env python3
"""The whole text-to-image chain in PyTorch: the counterpart of `fmboost bench chain`.

SD 1.5's architectures with random weights, from PyPI's diffusers and transformers:
CLIPTextModel on [negative prompt, prompt] (fixed token ids), UNet2DConditionModel at a 64²
latent for 25 DDIM steps with classifier-free guidance (batch 2) and, separately, 4 LCM steps
with guidance 1 (batch 1, the LCM-LoRA recipe), the paper-config CFM hop 64²→128² (the
reference EfficientUNet from torch_efficient_unet.py, 40 Euler NFE; two hops to 256² for
--px 2048) and AutoencoderKL's decode (untiled at 1024²; diffusers' own tiling at 2048²).
Prints one JSON line with the Rust bench's fields (cli/src/bench/chain.rs).

    /work/venv/bin/python scripts/bench/torch_chain_bench.py --px 1024 --threads 2
    /work/venv/bin/python scripts/bench/torch_chain_bench.py --px 1024 --stages text,cfm --cfm-steps 2
"""

import argparse
import json
import os
import resource
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch_efficient_unet import PAPER_CONFIG, EfficientUNet  # noqa: E402

STAGES = ["text", "ddim", "lcm", "cfm", "decode"]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
BASE_LATENT = 64
START_TOKEN, END_TOKEN = 49406, 49407

# SD 1.5's unet/config.json, vae/config.json and scheduler/scheduler_config.json.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)
VAE_SCALING = 0.18215


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--px", type=int, default=1024, help="1024 (one hop, untiled decode) or 2048 (two hops, tiled decode)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all CPUs)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ", ".join(STAGES))
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--lcm-steps", type=int, default=4)
    p.add_argument("--cfm-steps", type=int, default=40, help="Euler steps (= NFE) per CFM hop")
    p.add_argument("--guidance", type=float, default=7.5)
    args = p.parse_args()
    if args.px not in (1024, 2048):
        p.error(f"--px {args.px}: must be 1024 or 2048")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            p.error(f"--stages: unknown stage `{s}` (expected some of {', '.join(STAGES)})")
    if len(set(stages)) != len(stages) or not stages:
        p.error("--stages: empty or a stage given twice")
    args.stages = [s for s in STAGES if s in stages]
    for flag in ("ddim_steps", "lcm_steps", "cfm_steps"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')}: must be > 0")
    if not args.guidance > 1.0:
        p.error(f"--guidance {args.guidance}: must be > 1 (the DDIM run measures classifier-free guidance)")
    return args


def main():
    args = parse_args()
    from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(f):
        sync()
        start = time.perf_counter()
        out = f()
        sync()
        return out, time.perf_counter() - start

    def check_finite(t, what):
        if not torch.isfinite(t.float().sum()).item():
            raise SystemExit(f"{what} produced non-finite values")

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    hops = 2 if args.px == 2048 else 1
    seconds, extra = {}, {}
    cpu_start = time.process_time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode():
        if "text" in args.stages:
            # SD 1.5's text encoder (CLIP ViT-L/14), transformers' defaults = openai/clip-vit-large-patch14's text half.
            encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768)).eval().to(device=device, dtype=dtype)
            prompt = [START_TOKEN, 320, 1125, 539, 320, 2368, 530, 518, 3272, END_TOKEN]
            negative = [START_TOKEN, END_TOKEN]
            ids = torch.tensor([negative + [END_TOKEN] * (77 - len(negative)),
                                prompt + [END_TOKEN] * (77 - len(prompt))], device=device)
            context, s = timed(lambda: encoder(ids).last_hidden_state)
            check_finite(context, "the text encoder")
            seconds["text"] = s
            del encoder
        else:
            context = torch.zeros(2, 77, 768, device=device, dtype=dtype)

        base_latent = None
        if "ddim" in args.stages or "lcm" in args.stages:
            unet = UNet2DConditionModel(**SD15_UNET).eval().to(device=device, dtype=dtype)

            def base_run(scheduler, steps, guidance):
                scheduler.set_timesteps(steps, device=device)
                latents = randn(1, 4, BASE_LATENT, BASE_LATENT).to(dtype) * scheduler.init_noise_sigma
                ctx = context if guidance else context[1:]
                for t in scheduler.timesteps:
                    inp = scheduler.scale_model_input(latents, t)
                    if guidance:
                        both = unet(torch.cat([inp, inp]), t, encoder_hidden_states=ctx).sample
                        u, c = both.chunk(2)
                        out = u + guidance * (c - u)
                    else:
                        out = unet(inp, t, encoder_hidden_states=ctx).sample
                    latents = scheduler.step(out, t, latents, generator=gen).prev_sample
                return latents

            if "ddim" in args.stages:
                lat, s = timed(lambda: base_run(DDIMScheduler(**SD15_SCHEDULER), args.ddim_steps, args.guidance))
                check_finite(lat, "the DDIM run")
                seconds["ddim"] = s
                extra["ddim"] = {"steps": args.ddim_steps, "unet_evals": 2 * args.ddim_steps, "guidance": args.guidance,
                                 "seconds_per_step": s / args.ddim_steps}
                base_latent = lat
            if "lcm" in args.stages:
                lat, s = timed(lambda: base_run(LCMScheduler(**SD15_SCHEDULER), args.lcm_steps, None))
                check_finite(lat, "the LCM run")
                seconds["lcm"] = s
                extra["lcm"] = {"steps": args.lcm_steps, "unet_evals": args.lcm_steps, "guidance": 1.0,
                                "seconds_per_step": s / args.lcm_steps}
                base_latent = lat if base_latent is None else base_latent
            del unet
            base_latent = base_latent.float()
        else:
            base_latent = randn(1, 4, BASE_LATENT, BASE_LATENT)

        if "cfm" in args.stages:
            net = EfficientUNet.from_config(dict(PAPER_CONFIG)).eval().to(device=device, dtype=dtype)
            alpha_bar = cosine_alpha_bar(400)
            z, per_hop, total = base_latent, [], 0.0

            def hop(z_lo):
                # The reference sampler: z_up, x0 = √ᾱ·z_up + √(1−ᾱ)·ε, Euler on linspace(0, 1, steps + 1).
                z_up = F.interpolate(z_lo, scale_factor=2, mode="bilinear", align_corners=False)
                x = alpha_bar ** 0.5 * z_up + (1 - alpha_bar) ** 0.5 * torch.randn(z_up.shape, generator=gen).to(device)
                ctx = z_up.to(dtype)
                grid = torch.linspace(0, 1, args.cfm_steps + 1)
                for i in range(args.cfm_steps):
                    t = torch.full((1,), float(grid[i]), device=device)
                    v = net(x.to(dtype), t, ctx).float()
                    x = x + (grid[i + 1] - grid[i]).item() * v
                return x

            for _ in range(hops):
                side = z.shape[-1]
                out, s = timed(lambda: hop(z))
                check_finite(out, "the CFM hop")
                per_hop.append({"from": side, "to": 2 * side, "nfe": args.cfm_steps, "seconds": s,
                                "seconds_per_nfe": s / args.cfm_steps})
                total += s
                z = out
            seconds["cfm"] = total
            extra["cfm"] = {"config": "paper", "solver": "euler", "hops": per_hop}
            top = z
            del net
        else:
            side = BASE_LATENT << hops
            top = randn(1, 4, side, side)

        if "decode" in args.stages:
            vae = AutoencoderKL(**SD15_VAE).eval().to(device=device, dtype=dtype)
            tiled = args.px == 2048
            if tiled:
                vae.enable_tiling()
            image, s = timed(lambda: vae.decode((top / VAE_SCALING).to(dtype)).sample)
            check_finite(image, "the VAE decode")
            if list(image.shape) != [1, 3, args.px, args.px]:
                raise SystemExit(f"decoded image has shape {list(image.shape)}, expected [1, 3, {args.px}, {args.px}]")
            seconds["decode"] = s
            extra["decode"] = {"tiled": tiled, "tile": None, "overlap": None}

    def per_image(base):
        parts = ["text", base, "cfm", "decode"]
        return sum(seconds[p] for p in parts) if all(p in seconds for p in parts) else None

    import diffusers
    import transformers
    line = {
        "bench": "chain",
        "impl": "pytorch",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "px": args.px,
        "base_latent": BASE_LATENT,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "stages": args.stages,
        "seconds": seconds,
        "seconds_per_image": per_image("ddim"),
        "seconds_per_image_lcm": per_image("lcm"),
        **extra,
        "cpu_seconds": time.process_time() - cpu_start,
        "load_avg_1m": os.getloadavg()[0],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        line["gpu"] = torch.cuda.get_device_name(device)
        line["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(line))


def cosine_alpha_bar(step, steps=1000):
    """ᾱ at `step` of the reference's cosine table (models/src/cfm/sampler.rs, alpha_bar_cosine)."""
    import math
    t = step / (steps - 1)
    log_snr = -2.0 * math.log(math.tan(math.pi * t / 2) + 1e-5)
    return 1.0 / (1.0 + math.exp(-log_snr))

if __name__ == "__main__":
    main()
