"""Sampling throughput of `dit`, `mgd3` and `d3hr` on a random-initialised backbone, against the FLOP limit.

Times gendd's own sampling loop (:func:`gendd.backbone.sample` with CFG, MGD3's :class:`ModeGuidance` hook,
:func:`gendd.backbone.ddim_invert`) plus the VAE decode, at a batch of ``classes x IPC`` latents (what
``gendd distill --class-batch`` sends), and counts the FLOPs of the same work (torch's FlopCounterMode on one
denoiser forward and one decode), so ``limit`` = peak FLOP/s / FLOP per image is what no implementation can beat.

Shapes: ``xl`` = the diffusers configs of ``facebook/DiT-XL-2-256`` (675 M parameters, 4x32x32 latents) and the
SD VAE (``stabilityai/sd-vae-ft-ema``, 256 px RGB); ``fmnist`` = gendd's shipped Fashion-MNIST v1 shape
(2.1 M-parameter DiT, 4x8x8 latents, 32 px). Weights are random: throughput does not depend on them.

    python benchmarks/gpu_throughput.py --shape xl --device cuda --precision bf16 --batches 10 80 --peak-tflops 989
    python benchmarks/gpu_throughput.py --shape fmnist --batches 10 100 --steps 50   # CPU figures
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from gendd.backbone import SamplerConfig, ddim_invert, sample
from gendd.backbone.backbone import Backbone, BackboneMeta, _diffusers
from gendd.methods.mgd3 import ModeGuidance

DIT_XL_2_256 = dict(sample_size=32, in_channels=4, out_channels=8, patch_size=2, num_layers=28,
                    num_attention_heads=16, attention_head_dim=72, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                    activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=256, scaling_factor=0.18215)
FMNIST_DIT = dict(sample_size=8, in_channels=4, out_channels=4, patch_size=2, num_layers=6, num_attention_heads=4,
                  attention_head_dim=32, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
                  activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False)
FMNIST_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(32, 64, 64),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, sample_size=32, scaling_factor=0.3586)
SHAPES = {"xl": (DIT_XL_2_256, SD_VAE, BackboneMeta(image_size=256, channels=3, default_cfg_scale=4.0)),
          "fmnist": (FMNIST_DIT, FMNIST_VAE, BackboneMeta(image_size=32, channels=1, pad=2, default_cfg_scale=3.0))}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "clip_sample": False}


def build(shape: str, device: str) -> Backbone:
    d = _diffusers()
    dit_cfg, vae_cfg, meta = SHAPES[shape]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bb = Backbone(d.AutoencoderKL(**vae_cfg).eval(), d.DiTTransformer2DModel(**dit_cfg).eval(), SCHEDULE, meta)
    return bb.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def flops(bb: Backbone, batch: int) -> tuple[float, float]:
    """FLOPs of one denoiser forward and of one VAE decode, per latent (at ``batch`` latents)."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(batch, *bb.latent_shape, device=bb.device)
    t = torch.full((batch,), 500, device=bb.device)
    y = torch.zeros(batch, dtype=torch.long, device=bb.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            bb.model_output(z, t, y)
        fwd = fc.get_total_flops() / batch
        with FlopCounterMode(display=False) as fc:
            bb.decode(z)
        dec = fc.get_total_flops() / batch
    return fwd, dec


def run(shape: str, device: str, precision: str, compile: bool, batches: list[int], ipc: int, steps: int,
        repeats: int, peak_tflops: float | None, methods: list[str]) -> list[dict]:
    bb = build(shape, device).set_execution(precision, compile=compile)
    dev = bb.device
    cfg_scale = bb.meta.default_cfg_scale
    fwd, dec = flops(bb, min(batches))
    rows = []
    for batch in batches:
        classes = max(1, batch // ipc)
        labels = torch.arange(classes).repeat_interleave(ipc)[:batch] % bb.denoiser.config.num_embeds_ada_norm
        noise = torch.randn(batch, *bb.latent_shape)
        modes = torch.randn(batch, *bb.latent_shape)
        ddpm = SamplerConfig(sampler="ddpm", num_steps=steps, cfg_scale=cfg_scale, batch_size=batch)
        ddim = SamplerConfig(sampler="ddim", num_steps=steps, cfg_scale=cfg_scale, batch_size=batch)
        n_inv = min(31, steps - 1) if steps > 1 else 0  # D3HR's default 31 of 50

        def decode(z):
            for a in range(0, z.shape[0], 64):  # export's chunks
                bb.decode(z[a:a + 64])

        work = {
            "dit": (lambda: decode(sample(bb, noise, labels, ddpm, generator=torch.Generator().manual_seed(0))),
                    steps * 2 * fwd + dec),
            "mgd3": (lambda: decode(sample(bb, noise, labels, ddpm, hooks=[ModeGuidance(modes, 0.1, (steps - 1) // 2,
                                                                                         "mean")],
                                           generator=torch.Generator().manual_seed(0))),
                     steps * 2 * fwd + dec),
            "d3hr-inversion": (lambda: ddim_invert(bb, modes, labels, n_inv, ddim), n_inv * 2 * fwd),
            "d3hr-sampling": (lambda: decode(sample(bb, noise, labels, ddim, start_step=steps - n_inv - 1)),
                              (n_inv + 1) * 2 * fwd + dec),
        }
        for name in methods:
            for key in [k for k in work if k == name or k.startswith(name + "-")]:
                fn, flop_per_image = work[key]
                sec = _timed(fn, dev, repeats)
                row = {"shape": shape, "device": str(dev), "precision": precision, "compile": compile,
                       "work": key, "batch": batch, "classes": classes, "steps": steps, "seconds": round(sec, 4),
                       "per_s": round(batch / sec, 3), "gflop_per_item": round(flop_per_image / 1e9, 3)}
                if peak_tflops:
                    limit = peak_tflops * 1e12 / flop_per_image
                    row.update(limit_per_s=round(limit, 1), fraction_of_limit=round(batch / sec / limit, 4))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="fmnist")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[10, 100], help="latents per request")
    ap.add_argument("--ipc", type=int, default=10, help="latents per class inside a request")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=["dit", "mgd3", "d3hr"])
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak at --precision (H100/H200 SXM bf16: 989)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--flops-only", action="store_true", help="count the FLOPs per image (and the limit), time nothing")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if a.flops_only:
        bb = build(a.shape, a.device)
        fwd, dec = flops(bb, 1)
        procs = sorted({type(m.processor).__name__ for m in bb.denoiser.modules() if hasattr(m, "processor")})
        params = sum(p.numel() for p in bb.denoiser.parameters())
        print(f"{a.shape}: DiT {params / 1e6:.1f} M parameters, attention {', '.join(procs)}; one forward "
              f"{fwd / 1e9:.2f} GFLOP/latent, one decode {dec / 1e9:.2f} GFLOP/image")
        for work, f in (("dit / mgd3 (DDPM, CFG)", a.steps * 2 * fwd + dec),
                        ("d3hr inversion", 31 * 2 * fwd), ("d3hr sampling", 32 * 2 * fwd + dec)):
            lim = f"; limit {a.peak_tflops * 1e12 / f:.0f}/s at {a.peak_tflops} TFLOP/s" if a.peak_tflops else ""
            print(f"  {work}: {f / 1e12:.3f} TFLOP per image{lim}")
        return
    rows = run(a.shape, a.device, a.precision, a.compile, a.batches, a.ipc, a.steps, a.repeats, a.peak_tflops,
               a.methods)
    print("\n| work | batch (classes) | images/s | GFLOP/image | limit/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['work']} | {r['batch']} ({r['classes']}) | {r['per_s']:.2f} | {r['gflop_per_item']:.2f} | "
              f"{r.get('limit_per_s', 'n/a')} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
