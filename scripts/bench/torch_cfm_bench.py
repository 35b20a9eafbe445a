#!/usr/bin/env python3
"""Seconds per network evaluation (NFE) of the PyTorch reference EfficientUNet.

The PyTorch counterpart of `fmboost bench cfm` (cli/src/bench/cfm.rs): the same network
(torch_efficient_unet.py, checked against the golden vectors by check_torch_unet.py), random
weights, x_t [batch, out_channels, N, N] plus context [batch, in_channels − out_channels, N, N],
t = 0.5, `--warmup` untimed then `--steps` timed forwards. Prints one JSON line with the Rust
bench's field names; `seconds_per_nfe` is the MEDIAN of the timed forwards, as in the Rust
bench (`seconds_mean` is there too).

    /usr/bin/python3 scripts/bench/torch_cfm_bench.py --config paper --latent 128
    /usr/bin/python3 scripts/bench/torch_cfm_bench.py --config tiny --latent 16 --steps 1

Works with torch 1.13 (Debian, CPU) and torch 2.x (CPU or CUDA).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from torch_efficient_unet import (  # noqa: E402
    PAPER_CONFIG,
    TINY_CONFIG,
    EfficientUNet,
    flops_per_forward,
    parse_config,
)

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load_config(spec):
    if spec == "paper":
        return dict(PAPER_CONFIG)
    if spec == "tiny":
        return dict(TINY_CONFIG)
    try:
        with open(spec) as f:
            return parse_config(f.read())
    except OSError as e:
        raise SystemExit(f"--config {spec}: not `paper`, `tiny` or a readable JSON file ({e})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="paper", help="`paper`, `tiny` or a JSON file with a UNet config")
    p.add_argument("--latent", type=int, default=128, help="side of the square latent (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed network evaluations (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed evaluations first")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all CPUs)")
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "math"],
                   help="softmax attention: auto = F.scaled_dot_product_attention where torch has it "
                        "(as the reference), math = explicit QKᵀ/softmax/V")
    args = p.parse_args()

    config = load_config(args.config)
    if args.steps <= 0 or args.batch <= 0 or args.warmup < 0:
        raise SystemExit("--steps and --batch must be > 0, --warmup ≥ 0")
    multiple = 1 << (len(config["channel_mult"]) - 1)
    if args.latent <= 0 or args.latent % multiple:
        raise SystemExit(f"--latent {args.latent}: must be a positive multiple of {multiple} for this config")
    if config["in_channels"] < config["out_channels"]:
        raise SystemExit("--config: in_channels < out_channels: no room for x_t")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        print(f"warning: --dtype {args.dtype} on the CPU (the Rust bench refuses half precision on the CPU)",
              file=sys.stderr)
    use_sdpa = {"auto": None, "sdpa": True, "math": False}[args.attention]
    if args.attention == "sdpa" and not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        raise SystemExit(f"--attention sdpa: torch {torch.__version__} has no scaled_dot_product_attention")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = EfficientUNet.from_config(config, use_sdpa=use_sdpa).eval().to(device=device, dtype=dtype)
    params = sum(p.numel() for p in net.parameters())
    attention = "sdpa" if net.middle_block[1].attention.use_sdpa else "math"

    side = args.latent
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, config["out_channels"], side, side, generator=gen).to(device=device, dtype=dtype)
    ctx_channels = config["in_channels"] - config["out_channels"]
    context = (torch.randn(args.batch, ctx_channels, side, side, generator=gen).to(device=device, dtype=dtype)
               if ctx_channels > 0 else None)
    t = torch.full((args.batch,), 0.5, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def evaluate():
        """(wall seconds, CPU seconds of the whole process) of one forward."""
        sync()
        cpu_start = time.process_time()
        start = time.perf_counter()
        v = net(x, t, context)
        sync()
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        # Touch the result so nothing is skipped, and catch NaNs from broken kernels.
        if not torch.isfinite(v.float().sum()).item():
            raise SystemExit("the forward produced non-finite values")
        return seconds, cpu_seconds

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for _ in range(args.warmup):
            evaluate()
        runs = [evaluate() for _ in range(args.steps)]

    times = sorted(r[0] for r in runs)
    cpu_times = sorted(r[1] for r in runs)
    median = times[len(times) // 2]  # the same pick as the Rust bench (upper median)
    flops = flops_per_forward(config, args.batch, side, side)
    line = {
        "bench": "cfm",
        "impl": "pytorch",
        "torch": torch.__version__,
        "config": args.config,
        "latent": side,
        "batch": args.batch,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "attention": attention,
        "params": params,
        "flops_per_nfe": flops,
        "seconds_per_nfe": median,
        "seconds_mean": statistics.fmean(times),
        "seconds_min": times[0],
        "seconds_max": times[-1],
        "timed_nfe": args.steps,
        "warmup": args.warmup,
        "gflops_per_s": flops / median / 1e9,
        "cpu_seconds_per_nfe": cpu_times[len(cpu_times) // 2],
        "load_avg_1m": os.getloadavg()[0],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        line["gpu"] = torch.cuda.get_device_name(device)
        line["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
