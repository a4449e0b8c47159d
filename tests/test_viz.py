import torch

from lcr_lightly import with_common_rationale
from lcr_lightly.data import SyntheticFineGrained
from lcr_lightly.viz import (
    projection_figure,
    prune_head,
    rank_projections,
    rationale_figure,
    rationale_maps,
    ssl_gradcam,
    synthetic_grid,
)
from tests.conftest import ToySiamese, two_view_batch


def test_ssl_gradcam_has_no_side_effects_and_matches_manual():
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    views, labels = two_view_batch(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cams = ssl_gradcam(model, views)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.common_rationale.capture.maps == []
    # Manual: the unwrapped model's SSL loss, its gradient at layer4's first output.
    reference = ToySiamese()
    reference.load_state_dict(
        {k: v for k, v in before.items() if not k.startswith("common_rationale.")}
    )
    outputs = []
    reference.backbone.layer4.register_forward_hook(lambda m, a, out: outputs.append(out))
    loss = ToySiamese.training_step(reference, (views, labels), 0)
    (grad,) = torch.autograd.grad(loss, outputs[0])
    cam = (outputs[0] * grad).sum(1).clamp(min=0).detach()
    expected = cam / cam.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(cams, expected)


def test_figures_and_pruning(tmp_path):
    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=6)
    views, _ = two_view_batch(3)
    images = views[0]
    path = rationale_figure(
        model, images, views, str(tmp_path / "f.png"), part_masks=torch.zeros(3, 32, 32)
    )
    assert (tmp_path / "f.png").stat().st_size > 1000 and path.endswith("f.png")
    order = rank_projections(model, [(images,)])
    proj = rationale_maps(model, images)["projections"]
    var = proj.permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False)
    assert torch.equal(order, var.argsort(descending=True))
    projection_figure(model, images, str(tmp_path / "p.png"), order=order, top=3)
    keep = order[:2].tolist()
    prune_head(model, keep)
    pruned = rationale_maps(model, images)["projections"]
    torch.testing.assert_close(pruned, proj[:, keep])
    ds = SyntheticFineGrained(num_classes=3, images_per_class=1, image_size=32)
    synthetic_grid(ds, str(tmp_path / "g.png"), classes=3)
    assert (tmp_path / "g.png").exists()


def test_figure_maps_share_one_scale_and_include_the_feature_norm(tmp_path):
    from lcr_lightly.viz import figure_maps

    torch.manual_seed(0)
    model = with_common_rationale(ToySiamese(), k=4)
    views, _ = two_view_batch(3)
    images = views[0]
    maps = figure_maps(model, images, views)
    # independent: layer4's output in eval mode, its L2 norm over channels, / per-image max
    outputs = []
    hook = model.backbone.layer4.register_forward_hook(lambda m, a, out: outputs.append(out))
    model.eval()
    with torch.no_grad():
        model.backbone(images)
    hook.remove()
    norm = outputs[0].norm(dim=1).flatten(1)
    low, high = norm.amin(1, keepdim=True), norm.amax(1, keepdim=True)
    torch.testing.assert_close(maps["norm"].flatten(1), (norm - low) / (high - low))
    for name in ("gradcam", "rationale", "norm"):  # one [0, 1] scale, each peaks at 1
        torch.testing.assert_close(maps[name].flatten(1).amax(1), torch.ones(3))
        assert maps[name].min() >= 0
    path = tmp_path / "f.png"
    rationale_figure(model, images, views, str(path), part_masks=torch.zeros(3, 32, 32))
    from PIL import Image

    assert Image.open(path).size[0] >= 1000  # four columns at 120 dpi


def test_drawing_never_changes_the_users_matplotlib_backend(tmp_path):
    """The library draws on Figure objects: the backend chosen before it stays, pyplot is empty."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import matplotlib
matplotlib.use("svg")  # the user's choice, not Agg
import lcr_lightly, lcr_lightly.viz, lcr_lightly.gallery
from lcr_lightly.data import SyntheticFineGrained
from lcr_lightly.gallery import SearchResult, search_figure
import numpy as np
ds = SyntheticFineGrained(num_classes=2, images_per_class=1, image_size=32)
lcr_lightly.viz.synthetic_grid(ds, r"{tmp_path / "grid.png"}", classes=2)
ds.sample(0)["image"].save(r"{tmp_path / "a.png"}")
result = SearchResult(np.ones((1, 1)), np.zeros((1, 1), dtype=int), [["a.png"]])
search_figure([r"{tmp_path / "a.png"}"], result, r"{tmp_path}", r"{tmp_path / "search.png"}")
import matplotlib.pyplot as plt
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "MPLBACKEND": ""}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["svg", "0"]
    for name in ("grid.png", "search.png"):  # written as PNG all the same
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
