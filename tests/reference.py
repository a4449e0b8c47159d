"""The head and the fitting loss written out by hand, for tests of the code that uses them.

Transcriptions of the paper's formulas with plain tensor operations, sharing no code
with :mod:`lcr_lightly.heads` or :mod:`lcr_lightly.losses`: tests of ``kl_term``, the
wrapped training step and the step record compare with these, not with the modules
under test.
"""

import torch
from torch import Tensor, nn


def head_map(head: nn.Module, features: Tensor) -> Tensor:
    """A = max_k ReLU(BN(W_k . F)): a 1x1 conv (K, C), batch norm, ReLU, max over K.

    Batch norm uses the batch statistics (biased variance) in training mode and the
    running statistics in eval mode, as ``nn.BatchNorm2d`` does; nothing is updated.
    """
    weight = head.conv.weight[:, :, 0, 0]  # (K, C)
    z = torch.einsum("kc,bchw->bkhw", weight.to(features.dtype), features)
    bn = head.bn
    if bn.training:
        mean = z.mean(dim=(0, 2, 3))
        var = z.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    shape = (1, -1, 1, 1)
    z = (z - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    z = z * bn.weight.view(shape) + bn.bias.view(shape)
    return torch.relu(z).amax(dim=1)


def fit_loss(loss_fn: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """KL between softmaxes of the head map A and the GradCAM G, per ``loss_fn``'s options.

    Reads only the options (tau, target, head, direction, detach_target, reduction,
    softmax axes) of a :class:`~lcr_lightly.GradCAMFitLoss`.
    """
    width = a.shape[-1]
    a, g = a.float().flatten(1), g.float().flatten(1)
    if loss_fn.detach_target:
        g = g.detach()
    if loss_fn.head == "minmax":  # one range for the whole batch
        span = a.max() - a.min()
        a = (a - a.min()) / (span + 1e-7) if span > 0 else torch.ones_like(a)
    if loss_fn.target == "max":
        g = g / g.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    batch = a.shape[0]
    if loss_fn.softmax == "rows":
        a, g = a.reshape(-1, width), g.reshape(-1, width)
    p_a = torch.softmax(a / loss_fn.tau, dim=1)
    p_g = torch.softmax(g / loss_fn.tau, dim=1)
    p, q = (p_g, p_a) if loss_fn.direction == "forward" else (p_a, p_g)
    per_image = (p * (p.log() - q.log())).sum(dim=1).reshape(batch, -1).sum(dim=1)
    return per_image.sum() if loss_fn.reduction == "sum" else per_image.mean()


def kl_term(lcr: nn.Module, features: Tensor, cam: Tensor) -> Tensor:
    """The fitting loss of one view: :func:`fit_loss` of :func:`head_map`."""
    if lcr.detach_features:  # the KL trains the head only
        features, cam = features.detach(), cam.detach()
    return fit_loss(lcr.loss_fn, head_map(lcr.head, features), cam)
