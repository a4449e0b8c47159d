"""Mixed precision and memory checks of a wrapped model: fp32 vs bf16 vs fp16 + GradScaler.

    python benchmarks/precision_checks.py --device cuda   # ResNet-50, 224 px, batch 64
    python benchmarks/precision_checks.py --device cpu    # ResNet-18, 64 px, batch 8

For each precision, starting from the same weights and the same two-view batch:

1. the first wrapped MoCo v2 training step under ``torch.autocast``: the dtypes of the
   GradCAM target and of the KL (must be float32) and of the head map (autocast's), the
   SSL loss, the GradCAM map and the KL term, and their relative error against fp32
   (the GradCAM is computed in float32 but from the low-precision backward's gradients),
   how many images' GradCAMs are all zero, and how much the GradCAM's loss scaling
   changes it (vs ``loss_scale=1``; 0 where no scaling applies);
2. ``--steps`` optimiser steps (200 on CUDA, 20 on CPU; ``torch.amp.GradScaler`` for
   fp16): every loss finite, how many steps the scaler skipped, its final scale;
3. on CUDA, peak allocated memory over steps 10-20 and over the last 10 steps: equal
   peaks mean the captured feature maps are freed every step.

Prints a Markdown table and exits with status 1 if a check fails (tolerances are
options). Data are random tensors: the checks concern numerics, not accuracy.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Any, Dict, List, Optional

import torch
from overhead import make
from torch import Tensor, nn

from lcr_lightly import FeatureCapture, gradcam

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def scaling_effect(model: nn.Module, views: List[Tensor], labels: Tensor) -> float:
    """Relative L2 change of the first view's GradCAM made by the fp16 loss scaling.

    Recomputes the SSL loss with the model's own (unwrapped) training step, the online
    map recorded by a capture of the test's own, and compares :func:`gradcam` with its
    default scaling against no scaling.
    """
    lcr = model.common_rationale
    with FeatureCapture(lcr.layer) as capture:
        loss = type(model).training_step(model, (views, labels), 0)
        maps = capture.outputs[:1]
        (cam,), (plain,) = gradcam(loss, maps), gradcam(loss, maps, loss_scale=1.0)
    return float((cam - plain).norm() / cam.norm().clamp_min(1e-12))


def check(precision: str, args: argparse.Namespace, views: List[Tensor]) -> Dict[str, Any]:
    """Runs the checks of one precision; returns the measured values."""
    device = args.device
    model = make("mocov2", args.backbone, args.batch_size, True, device)
    model.common_rationale.record = True
    ssl: List[float] = []
    kls: List[float] = []
    dtypes: List[str] = []
    first_cam: Optional[Tensor] = None
    effect = float("nan")
    dtype = DTYPES[precision]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    labels = torch.zeros(len(views[0]), dtype=torch.long, device=device)
    totals: List[float] = []
    skipped = 0
    early_peak = late_peak = float("nan")
    for step in range(args.steps):
        if device == "cuda" and step in (10, 20, args.steps - 10):
            torch.cuda.synchronize()
            if step == 20:
                early_peak = torch.cuda.max_memory_allocated() / 2**20
            if step in (10, args.steps - 10):
                torch.cuda.reset_peak_memory_stats()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            if step == 0:  # first step: GradCAM with its default vs no loss scaling
                effect = scaling_effect(model, views, labels)
            total = model.training_step((views, labels), 0)
        record = model.common_rationale.last_step
        ssl.append(float(record.ssl_loss))
        kls.append(float(record.kl))
        for cam, head_map in zip(record.gradcams, record.head_maps):
            dtypes.append(" / ".join(str(t.dtype)[6:] for t in (cam, head_map, record.kl)))
        if first_cam is None:
            first_cam = record.gradcams[0].float().cpu()
        totals.append(float(total.detach()))
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            skipped += 1  # the scaler found inf/nan gradients and skipped this step
    if device == "cuda":
        torch.cuda.synchronize()
        late_peak = torch.cuda.max_memory_allocated() / 2**20
    finite = all(torch.isfinite(torch.tensor(totals)).tolist())
    return {
        "dtypes": sorted(set(dtypes)),
        "ssl0": ssl[0],
        "kl0": kls[0],
        "cam0": first_cam,
        "scaling_effect": effect,
        "finite": finite,
        "skipped": skipped,
        "scale": scaler.get_scale() if scaler.is_enabled() else None,
        "early_peak": early_peak,
        "late_peak": late_peak,
    }


def relative_error(value: float, reference: float) -> float:
    """``|value - reference| / |reference|`` (the absolute error when the reference is 0)."""
    return abs(value - reference) / (abs(reference) or 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=None, help="200 on CUDA, 20 on CPU")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--loss-rtol", type=float, default=0.02, help="SSL loss vs fp32")
    parser.add_argument(
        "--kl-rtol",
        type=float,
        default=0.15,
        help="KL term vs fp32; GradCAM comes from the low-precision backward, whose "
        "gradients differ from fp32 by several percent (measured: ~9 %% for bf16)",
    )
    parser.add_argument("--memory-atol-mib", type=float, default=1.0)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.steps = args.steps or (200 if cuda else 20)
    if cuda and args.steps < 30:
        parser.error("--steps must be at least 30 on CUDA (two 10-step memory windows)")
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(
        f"device={args.device} ({name}) torch={torch.__version__} backbone={args.backbone} "
        f"image={args.image_size}px batch={args.batch_size} steps={args.steps} "
        f"tolerances: loss rtol {args.loss_rtol}, KL rtol {args.kl_rtol}"
    )
    gen = torch.Generator().manual_seed(0)
    views = [
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(
            args.device
        )
        for _ in range(2)
    ]
    results = {p: check(p, args, views) for p in args.precisions}
    ref = results.get("fp32")
    failures: List[str] = []
    print(
        "\n| precision | dtype: GradCAM / head map / KL | SSL loss (step 0) | KL (step 0) | "
        "loss rel. err. vs fp32 | GradCAM rel. L2 err. vs fp32 | all-zero GradCAMs | "
        "GradCAM change from loss scaling | KL rel. err. vs fp32 | "
        "all losses finite | scaler skips / final scale | peak MiB steps 10-20 / last 10 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for p, r in results.items():
        loss_err = relative_error(r["ssl0"], ref["ssl0"]) if ref else float("nan")
        kl_err = relative_error(r["kl0"], ref["kl0"]) if ref else float("nan")
        zero = int((r["cam0"].flatten(1).amax(dim=1) == 0).sum())
        cam_err = (
            float((r["cam0"] - ref["cam0"]).norm() / ref["cam0"].norm().clamp_min(1e-12))
            if ref
            else float("nan")
        )
        scaler = f"{r['skipped']} / {r['scale']:.0f}" if r["scale"] is not None else "–"
        memory = f"{r['early_peak']:.0f} / {r['late_peak']:.0f}" if cuda else "– (CPU)"
        print(
            f"| {p} | {', '.join(r['dtypes'])} | {r['ssl0']:.4f} | {r['kl0']:.4f} | "
            f"{loss_err:.4f} | {cam_err:.4f} | {zero} of {len(r['cam0'])} | "
            f"{r['scaling_effect']:.5f} | {kl_err:.4f} | {r['finite']} | {scaler} | {memory} |"
        )
        if any(not (d.startswith("float32") and d.endswith("float32")) for d in r["dtypes"]):
            failures.append(f"{p}: GradCAM or KL not in float32: {r['dtypes']}")
        if not r["finite"]:
            failures.append(f"{p}: a training loss was not finite")
        if loss_err > args.loss_rtol:
            failures.append(f"{p}: SSL loss differs from fp32 by {loss_err:.4f}")
        if kl_err > args.kl_rtol:
            failures.append(f"{p}: KL term differs from fp32 by {kl_err:.4f}")
        if cuda and abs(r["late_peak"] - r["early_peak"]) > args.memory_atol_mib:
            failures.append(f"{p}: peak memory grew from {r['early_peak']:.1f} MiB")
    print("\n" + ("\n".join(f"FAIL {f}" for f in failures) if failures else "all checks passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
