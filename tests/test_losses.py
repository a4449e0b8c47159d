import math

import pytest
import torch
import torch.nn.functional as F

from lcr_lightly import GradCAMFitLoss


def _softmax_rows(rows):
    out = []
    for row in rows:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        out.append([v / s for v in e])
    return out


def _kl_rows(p_rows, q_rows):
    return [sum(p * math.log(p / q) for p, q in zip(pr, qr)) for pr, qr in zip(p_rows, q_rows)]


def _hand_loss(a, g, tau, target, direction, reduction):
    a_rows = [[v / tau for v in row] for row in a.flatten(1).tolist()]
    g_rows = g.flatten(1).tolist()
    if target == "max":
        g_rows = [[v / max(row) for v in row] for row in g_rows]
    g_rows = [[v / tau for v in row] for row in g_rows]
    pa, pg = _softmax_rows(a_rows), _softmax_rows(g_rows)
    kls = _kl_rows(pg, pa) if direction == "forward" else _kl_rows(pa, pg)
    return sum(kls) if reduction == "sum" else sum(kls) / len(kls)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("target", ["raw", "max"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_kl_matches_hand_formula(direction, target, reduction):
    torch.manual_seed(0)
    a = torch.rand(3, 2, 3) * 2
    g = torch.rand(3, 2, 3) * 1e-2 + 1e-4
    loss = GradCAMFitLoss(
        tau=0.4, target=target, head="raw", direction=direction, reduction=reduction, softmax="map"
    )
    expected = _hand_loss(a.double(), g.double(), 0.4, target, direction, reduction)
    assert loss(a, g).item() == pytest.approx(expected, rel=1e-5)


def test_defaults_are_the_official_moco_loss():
    """The default loss is the one RESULTS.md section 11 chose on the validation split:
    the official MoCo lines, value and gradient (through A and through G)."""
    torch.manual_seed(1)
    featmap = torch.randn(3, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    grad_factor = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    featcov16 = torch.relu(torch.einsum("kc,bchw->bkhw", torch.randn(6, 4).double(), featmap))
    expected = _official_moco_lines(featmap, grad_factor, featcov16)
    gradcam = torch.relu((featmap * grad_factor).sum(dim=1))
    got = GradCAMFitLoss()(featcov16.amax(dim=1), gradcam)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)
    (want,) = torch.autograd.grad(expected, featmap, retain_graph=True)
    (have,) = torch.autograd.grad(got, featmap)
    torch.testing.assert_close(have.float(), want.float(), rtol=1e-4, atol=1e-6)


def test_official_preset_matches_official_formula():
    """GANPerf/LCR main.py: kl_div(log(softmax(att/t)), softmax(cam/t), 'sum'),
    att min-max normalised over the whole batch, cam not detached."""
    torch.manual_seed(1)
    feats = torch.randn(4, 5, 3, 3, requires_grad=True)
    raw_att = torch.rand(4, 3, 3) * 3
    gradcam = torch.relu((feats * torch.randn_like(feats)).sum(dim=1))
    # independent re-implementation of the official lines
    img = raw_att - torch.min(raw_att)
    att_max = img / (1e-7 + torch.max(img))
    t = 0.4
    grad_cam = (gradcam.view(4, -1) / t).float()
    att = (att_max.view(4, -1) / t).float()
    expected = F.kl_div(att.softmax(dim=-1).log(), grad_cam.softmax(dim=-1), reduction="sum")
    got = GradCAMFitLoss.official()(raw_att, gradcam)
    torch.testing.assert_close(got, expected)
    # gradient flows through the GradCAM target into the features, as in the official code
    (g_feats,) = torch.autograd.grad(got, feats)
    assert g_feats.abs().sum() > 0


def _official_moco_lines(featmap, grad_factor, featcov16):
    """Transcription of main_moco.py's loss_cam and builder.py's max_mask/GradCAM lines."""
    gradcam = torch.relu((featmap * grad_factor).sum(dim=1))
    img, _ = torch.max(featcov16, axis=1)
    img = img - torch.min(img)
    att_max = img / (1e-7 + torch.max(img))
    return F.kl_div(att_max.softmax(dim=-1).log(), gradcam.softmax(dim=-1), reduction="sum")


@pytest.mark.parametrize("shape", [(4, 6, 3, 5), (1, 3, 7, 7), (3, 2, 1, 4)])
def test_official_moco_preset_matches_official_lines_value_and_gradients(shape):
    """Value, and gradients into the features (through A and through G), equal the
    official MoCo lines on random maps; H != W catches a softmax over the wrong axis."""
    torch.manual_seed(2)
    b, c, h, w = shape
    featmap = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    grad_factor = torch.randn(b, c, h, w, dtype=torch.float64)  # dL/dF, no create_graph
    proj = torch.randn(5, c, dtype=torch.float64)
    featcov16 = torch.relu(torch.einsum("kc,bchw->bkhw", proj, featmap))
    expected = _official_moco_lines(featmap, grad_factor, featcov16)
    (want,) = torch.autograd.grad(expected, featmap, retain_graph=True)

    gradcam = torch.relu((featmap * grad_factor).sum(dim=1))
    got = GradCAMFitLoss.official("moco")(featcov16.amax(dim=1), gradcam)
    (have,) = torch.autograd.grad(got, featmap, retain_graph=True)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(have.float(), want.float(), rtol=1e-4, atol=1e-6)
    # the part of the gradient that reaches the features through G is not zero
    detached = GradCAMFitLoss.official("moco")(featcov16.amax(dim=1), gradcam.detach())
    (through_a,) = torch.autograd.grad(detached, featmap)
    assert (have - through_a.float()).abs().sum() > 0


def test_official_byol_preset_gradient_matches_official_lines():
    torch.manual_seed(3)
    featmap = torch.randn(3, 4, 2, 5, requires_grad=True)
    grad_factor = torch.randn_like(featmap)
    att = torch.relu(featmap[:, :2]).amax(dim=1)
    gradcam = torch.relu((featmap * grad_factor).sum(dim=1))
    img = att - torch.min(att)
    att_max = (img / (1e-7 + torch.max(img))).view(3, -1) / 0.4
    cam = gradcam.view(3, -1) / 0.4
    expected = F.kl_div(att_max.softmax(dim=-1).log(), cam.softmax(dim=-1), reduction="sum")
    (want,) = torch.autograd.grad(expected, featmap, retain_graph=True)
    got = GradCAMFitLoss.official("byol")(att, gradcam)
    (have,) = torch.autograd.grad(got, featmap)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(GradCAMFitLoss.official()(att, gradcam), expected)


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_rows_softmax_matches_hand_formula(reduction):
    """softmax='rows': each of the H rows is a W-way distribution; KL summed over rows."""
    torch.manual_seed(4)
    a = torch.rand(3, 2, 4).double() * 2
    g = torch.rand(3, 2, 4).double()
    tau = 0.5
    per_image = []
    for i in range(3):
        rows_a = [[v / tau for v in row] for row in a[i].tolist()]
        rows_g = [[v / tau for v in row] for row in g[i].tolist()]
        kls = _kl_rows(_softmax_rows(rows_g), _softmax_rows(rows_a))
        per_image.append(sum(kls))
    expected = sum(per_image) if reduction == "sum" else sum(per_image) / 3
    loss = GradCAMFitLoss(tau=tau, target="raw", head="raw", softmax="rows", reduction=reduction)
    assert loss(a.float(), g.float()).item() == pytest.approx(expected, rel=1e-5)


def test_rows_softmax_needs_maps_and_unknown_script_is_named():
    with pytest.raises(
        ValueError, match=r"^softmax='rows' needs \(B, H, W\) maps, got \(2, 9\)\.$"
    ):
        GradCAMFitLoss(softmax="rows")(torch.rand(2, 9), torch.rand(2, 9))
    with pytest.raises(ValueError, match=r"^Unknown script='simclr'; expected one of \("):
        GradCAMFitLoss.official("simclr")


def test_detach_target_controls_gradient_through_gradcam():
    a = torch.rand(2, 3, 3, requires_grad=True)
    g = torch.rand(2, 3, 3, requires_grad=True)
    GradCAMFitLoss(detach_target=True)(a, g).backward()
    assert g.grad is None and a.grad is not None
    GradCAMFitLoss(detach_target=False)(a, g).backward()
    assert g.grad is not None and g.grad.abs().sum() > 0


def test_max_target_is_scale_invariant_and_raw_is_not():
    torch.manual_seed(0)
    a, g = torch.rand(2, 4, 4), torch.rand(2, 4, 4)
    scaled = GradCAMFitLoss(target="max")
    torch.testing.assert_close(scaled(a, g), scaled(a, g * 1e-3))
    raw = GradCAMFitLoss(target="raw")
    assert not torch.allclose(raw(a, g), raw(a, g * 1e-3))


def test_minmax_head_option_normalises_over_batch():
    torch.manual_seed(0)
    a, g = torch.rand(2, 3, 3), torch.rand(2, 3, 3)
    lo, hi = a.min(), a.max()
    expected = GradCAMFitLoss(head="raw")((a - lo) / (hi - lo + 1e-7), g)
    torch.testing.assert_close(GradCAMFitLoss(head="minmax")(a, g), expected)


def test_kl_is_zero_for_identical_distributions():
    a = torch.rand(3, 4, 4)
    same = GradCAMFitLoss(target="raw", head="raw")(a, a.clone())
    torch.testing.assert_close(same, torch.tensor(0.0, dtype=same.dtype))


def test_bad_options_and_shapes():
    for name, value in (
        ("target", "norm"),
        ("head", "softmax"),
        ("direction", "both"),
        ("reduction", "mean"),
        ("softmax", "columns"),
    ):
        with pytest.raises(ValueError, match=rf"^Unknown {name}='{value}'; expected one of \("):
            GradCAMFitLoss(**{name: value})
    for tau in (0, -0.4, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="tau must be a finite positive number"):
            GradCAMFitLoss(tau=tau)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) must have the same shape\.$"):
        GradCAMFitLoss()(torch.rand(2, 3, 3), torch.rand(2, 3, 4))
