"""Step time and peak memory: baseline vs +LCR, measured side by side in one run.

For each method the unwrapped and the wrapped model take turns (interleaved steps, so
machine noise hits both alike); the script prints the median step time of each, the
ratio, and on CUDA the peak allocated memory of each. It also compares our lightly-built
MoCoV2 step with a hand-written pure-PyTorch MoCo v2 step (same backbone, head, queue).

    python benchmarks/overhead.py                       # CPU: resnet18, 112 px, batch 16
    python benchmarks/overhead.py --device cuda --backbone resnet50 --image-size 224 \
        --batch-size 128 --precision bf16               # the paper's setting on a GPU

A step is forward + backward + optimiser step (no data loading, no Lightning loop,
which costs the same with and without LCR).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torchvision
from torch import Tensor, nn

from lcr_lightly import with_common_rationale
from lcr_lightly.models import METHODS


def make(method: str, backbone: str, batch_size: int, lcr: bool, device: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"memory_bank_size": 4096} if method == "mocov2" else {}
    model = METHODS[method](backbone=backbone, batch_size=batch_size, **kwargs)
    if lcr:
        model = with_common_rationale(model, k=32)
    return model.to(device).train()


def stepper(
    model: nn.Module, views: List[Tensor], precision: str, device: str
) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    labels = torch.zeros(len(views[0]), dtype=torch.long, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(
            device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            loss = model.training_step((views, labels), 0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


class HandMoCoV2(nn.Module):
    """MoCo v2 written directly in PyTorch (no lightly), for the throughput comparison."""

    def __init__(
        self, backbone: str, dim: int = 256, queue: int = 4096, m: float = 0.999, t: float = 0.2
    ):
        super().__init__()
        net = getattr(torchvision.models, backbone)(weights=None)
        feat = net.fc.in_features
        net.fc = nn.Identity()
        self.q = nn.Sequential(net, nn.Linear(feat, 2048), nn.ReLU(), nn.Linear(2048, dim))
        self.k = copy.deepcopy(self.q)
        for p in self.k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", nn.functional.normalize(torch.randn(queue, dim), dim=1))
        self.m, self.t, self.ptr = m, t, 0

    def training_step(self, batch: Tuple[List[Tensor], Tensor], batch_idx: int) -> Tensor:
        """InfoNCE of the query of view 0 against the key of view 1 and the queue."""
        (x0, x1), _ = batch
        with torch.no_grad():
            for pq, pk in zip(self.q.parameters(), self.k.parameters()):
                pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)
            k = nn.functional.normalize(self.k(x1), dim=1)
        q = nn.functional.normalize(self.q(x0), dim=1)
        negatives = self.queue.clone().detach()  # the queue is updated in place below
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / self.t
        loss = nn.functional.cross_entropy(
            logits, torch.zeros(len(q), dtype=torch.long, device=q.device)
        )
        with torch.no_grad():
            n = len(k)
            idx = (torch.arange(n, device=k.device) + self.ptr) % len(self.queue)
            self.queue[idx] = k.to(self.queue.dtype)
            self.ptr = (self.ptr + n) % len(self.queue)
        return loss


def kl_term_seconds(
    model: nn.Module, views: List[Tensor], precision: str, device: str, n: int, warmup: int
) -> float:
    """Median time of ``common_rationale.kl_term`` (GradCAM + head + KL) in wrapped steps.

    On a shared CPU the difference of two step-time medians is noisier than the LCR work
    itself; this measures that work directly, from the module's own step record (kept
    only in these extra steps, so the side-by-side timing above runs without it).
    """
    lcr = model.common_rationale
    lcr.record = True
    step = stepper(model, views, precision, device)
    times: List[float] = []
    for i in range(warmup + n):
        step()
        if i >= warmup:
            times.append(lcr.last_step.seconds)
    lcr.record = False
    return statistics.median(times)


def measure(
    steps: Dict[str, Callable[[], None]], n: int, warmup: int, device: str
) -> Dict[str, Dict[str, float]]:
    times: Dict[str, List[float]] = {k: [] for k in steps}
    peaks: Dict[str, float] = {}
    for name, step in steps.items():  # warm-up (and peak memory, one at a time)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(n):  # interleaved timing
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {
        k: {"median_s": statistics.median(v), "peak_mib": peaks.get(k, float("nan"))}
        for k, v in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--methods", nargs="+", default=["mocov2", "byol", "simsiam", "simclr"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    backbone = args.backbone or ("resnet50" if cuda else "resnet18")
    size = args.image_size or (224 if cuda else 112)
    bs = args.batch_size or (128 if cuda else 16)
    n = args.steps or (30 if cuda else 20)
    if cuda:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(
        f"device={args.device} ({name}, {torch.get_num_threads()} threads) "
        f"torch={torch.__version__} backbone={backbone} "
        f"image={size}px batch={bs} precision={args.precision} steps={n} (median, interleaved)"
    )
    views = [torch.randn(bs, 3, size, size, device=args.device) for _ in range(2)]
    print(
        "| method | baseline ms/step | +LCR ms/step | time ratio | LCR kl_term ms (share of "
        "+LCR step) | baseline peak MiB | +LCR peak MiB | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        base = make(method, backbone, bs, False, args.device)
        lcr = make(method, backbone, bs, True, args.device)
        res = measure(
            {
                "base": stepper(base, views, args.precision, args.device),
                "lcr": stepper(lcr, views, args.precision, args.device),
            },
            n,
            args.warmup,
            args.device,
        )
        b, w = res["base"], res["lcr"]
        kl = kl_term_seconds(lcr, views, args.precision, args.device, n, args.warmup)
        mem = (
            f"{b['peak_mib']:.0f} | {w['peak_mib']:.0f} | {w['peak_mib'] / b['peak_mib']:.3f}"
            if cuda
            else "– | – | – (CPU)"
        )
        print(
            f"| {method} | {1000 * b['median_s']:.1f} | {1000 * w['median_s']:.1f} | "
            f"{w['median_s'] / b['median_s']:.3f} | {1000 * kl:.1f} "
            f"({100 * kl / w['median_s']:.1f} %) | {mem} |",
            flush=True,
        )
        del base, lcr
    ours = make("mocov2", backbone, bs, False, args.device)
    hand = HandMoCoV2(backbone).to(args.device).train()
    res = measure(
        {
            "ours": stepper(ours, views, args.precision, args.device),
            "hand": stepper(hand, views, args.precision, args.device),
        },
        n,
        args.warmup,
        args.device,
    )
    ratio = res["hand"]["median_s"] / res["ours"]["median_s"]
    print(
        f"\nlightly-built MoCoV2: {1000 * res['ours']['median_s']:.1f} ms/step; hand-written "
        f"PyTorch MoCo v2: {1000 * res['hand']['median_s']:.1f} ms/step; throughput of ours "
        f"relative to hand-written: {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
