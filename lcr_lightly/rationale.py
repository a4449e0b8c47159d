"""The LCR module: capture -> GradCAM -> head -> KL for one model, and ``attach``.

:class:`CommonRationale` holds everything LCR adds to a model: the capture of the online
encoder's feature maps (:mod:`lcr_lightly.capture`), the head (:mod:`lcr_lightly.heads`),
the fitting loss (:mod:`lcr_lightly.losses`) and the pooling hooks
(:mod:`lcr_lightly.pooling`). :meth:`CommonRationale.kl_term` turns the maps captured in
a step and that step's SSL loss into the KL term. :func:`attach` builds it for a backbone
(plain PyTorch loops); :func:`lcr_lightly.wrap.with_common_rationale` for a
LightningModule.
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_choice, check_options, check_real
from lcr_lightly.capture import FeatureCapture, Reshape
from lcr_lightly.gradcam import GRADCAM_MODES, gradcam
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.layers import FeaturePath, LayerSpec, find_feature_path, resolve_layer
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.pooling import POOLING_MODES, PoolingCheck, RationalePooling
from lcr_lightly.tracing import DryForwardError


def _clock(tensor: Tensor) -> float:
    """``time.perf_counter()`` after the tensor's device has finished its queued work."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


@dataclass
class StepRecord:
    """What :meth:`CommonRationale.kl_term` computed in one step.

    Kept in ``CommonRationale.last_step`` only while ``CommonRationale.record`` is True
    (tests, benchmarks, figures), so the training step keeps no extra references.

    Attributes:
        layer_name: Dotted name of the layer the maps come from.
        maps: Feature maps F that entered the KL, one per view, (B, C, H, W), detached.
        gradcams: Their GradCAMs G of the SSL loss, (B, H, W), float32.
        head_maps: The head's rationale maps A, (B, H, W), detached.
        kls: The fitting loss of each view (scalar tensors, detached).
        kl: Their mean (the returned term), detached.
        ssl_loss: The SSL loss the GradCAMs are of, detached.
        seconds: Wall time of the call (on CUDA the device is synchronised before both
            clock reads, only while recording).
    """

    layer_name: str
    maps: List[Tensor] = field(default_factory=list)
    gradcams: List[Tensor] = field(default_factory=list)
    head_maps: List[Tensor] = field(default_factory=list)
    kls: List[Tensor] = field(default_factory=list)
    kl: Optional[Tensor] = None
    ssl_loss: Optional[Tensor] = None
    seconds: float = 0.0


VIEWS = ("all", "first")


NONFINITE = ("error", "skip")


class FeatureSite(NamedTuple):
    """One encoder's feature layer and pool, as hooked by :class:`CommonRationale`.

    Attributes:
        layer_name: Dotted name of the feature layer (relative to the wrapped model).
        layer: The feature layer.
        pool_name: Dotted name of the global average pool, or None.
        pool: The pool, or None.
        online_candidate: Whether this encoder may be the online one (its maps are
            captured until the first training step decides).
    """

    layer_name: str
    layer: nn.Module
    pool_name: Optional[str] = None
    pool: Optional[nn.Module] = None
    online_candidate: bool = False


class _HookedSite:
    """The hooks LCR holds on one encoder: a capture (online candidates) and a pooler."""

    def __init__(
        self,
        site: FeatureSite,
        owner: CommonRationale,
        reshape: Optional[Reshape],
        capture: bool,
        eval_only: bool,
    ) -> None:
        self.layer_name = site.layer_name
        self.pool_name = site.pool_name
        self.capture: Optional[FeatureCapture] = (
            FeatureCapture(site.layer, reshape=reshape, name=site.layer_name) if capture else None
        )
        self.pooler: Optional[RationalePooling] = (
            RationalePooling(site.pool, owner, eval_only=eval_only)
            if site.pool is not None
            else None
        )

    def release(self) -> None:
        if self.capture is not None:
            self.capture.release()
        if self.pooler is not None:
            self.pooler.release()


class CommonRationale(nn.Module):
    """Everything LCR adds to a model: capture, head, loss and pooling.

    Registered as the ``common_rationale`` submodule by :func:`with_common_rationale`,
    so the head's weights are part of the model's ``state_dict``.

    Args:
        layer: The feature layer (output (B, C, H, W), or tokens with ``reshape``).
        in_channels: Channels C of the feature map.
        k: Number of head projections K.
        loss: The fitting loss; ``GradCAMFitLoss()`` when None.
        pool: The global pooling module to replace at inference, or None.
        detach_features: Train the head on detached maps (the backbone then sees only
            the SSL loss); False lets the KL gradient reach the backbone (official code).
        gradcam_mode: ``"elementwise"`` (LCR) or ``"channel"`` (classic Grad-CAM).
        views: ``"all"`` online views captured in a step, or only the ``"first"``
            (the official BYOL code).
        nonfinite: ``"error"`` raises on a non-finite SSL loss, GradCAM or KL;
            ``"skip"`` warns and drops the KL term (or the step, if the SSL loss is bad).
        reshape: Callable turning the layer output into a (B, C, H, W) map.
        normalize: Inference normalisation of the rationale map, ``"image"`` or
            ``"batch"`` (official code; ablation only).
        pool_in_training: Also use rationale pooling in training (a failing variant
            of the paper, for ablation).
        weight: Weight nu of the KL term used by :func:`with_common_rationale`.
        head_hidden: Hidden width of an MLP head (the paper's failing variant; ablation).
        layer_name: Dotted name of ``layer``, used in messages (its class name if None).
        pool_name: Dotted name of ``pool``, used in messages.
        copies: The same layer and pool in the online encoder's momentum/teacher copies
            (:class:`FeatureSite`); their pools are replaced at inference too, and those
            marked ``online_candidate`` are captured until the first training step finds
            which encoder the SSL loss depends on.

    Attributes:
        record: Keep what each :meth:`kl_term` computed in :attr:`last_step` (off by
            default: the training step then keeps no reference to its maps).
        last_step: The :class:`StepRecord` of the last recorded step, or None.
        layer_name: Dotted name of the online encoder's feature layer.
        pool_name: Dotted name of its pool (None when there is none).
        capture: The :class:`FeatureCapture` on the online layer.
        pooler: The :class:`RationalePooling` on the online pool, or None.
    """

    def __init__(
        self,
        layer: nn.Module,
        in_channels: int,
        k: int = 32,
        loss: Optional[GradCAMFitLoss] = None,
        pool: Optional[nn.Module] = None,
        detach_features: bool = False,
        gradcam_mode: str = "elementwise",
        views: str = "all",
        nonfinite: str = "error",
        reshape: Optional[Reshape] = None,
        normalize: str = "image",
        pool_in_training: bool = False,
        weight: float = 0.01,
        head_hidden: Optional[int] = None,
        layer_name: Optional[str] = None,
        pool_name: Optional[str] = None,
        copies: Sequence[FeatureSite] = (),
    ) -> None:
        super().__init__()
        check_choice("gradcam_mode", gradcam_mode, GRADCAM_MODES)
        check_choice("views", views, VIEWS)
        check_choice("nonfinite", nonfinite, NONFINITE)
        if loss is not None and not isinstance(loss, GradCAMFitLoss):
            raise TypeError(f"loss must be a GradCAMFitLoss, not {type(loss).__name__}.")
        self.head = CommonRationaleHead(
            in_channels, k=k, normalize=normalize, hidden_channels=head_hidden
        )
        self.loss_fn = loss if loss is not None else GradCAMFitLoss()
        self.detach_features = detach_features
        self.gradcam_mode = gradcam_mode
        self.views = views
        self.nonfinite = nonfinite
        self.pool_in_training = pool_in_training
        self.weight = check_real("weight", weight, allow_zero=True)
        self.batch_size = 0
        self.record = False
        self.last_step: Optional[StepRecord] = None
        self._warned_single_position = False
        self.pool_calls = 0  # rationale poolings done, for PoolingCheck
        self.pool_calls_seen = 0
        online = FeatureSite(
            layer_name or type(layer).__name__,
            layer,
            pool_name or (type(pool).__name__ if pool is not None else None),
            pool,
            True,
        )
        self.sites = [_HookedSite(online, self, reshape, capture=True, eval_only=False)]
        for site in copies:
            self.sites.append(
                _HookedSite(site, self, reshape, capture=site.online_candidate, eval_only=True)
            )
        self.pooling = "rationale" if self.pool_names else "gap"

    @classmethod
    def from_path(
        cls,
        path: FeaturePath,
        prefix: str = "",
        reshape: Optional[Reshape] = None,
        **options: Any,
    ) -> CommonRationale:
        """The module for a resolved feature path (layer, pool, channels, token reshape).

        Args:
            path: From :func:`~lcr_lightly.layers.find_feature_path`.
            prefix: Dotted name of the encoder ``path`` was found in (for messages).
            reshape: Overrides the path's own reshape (ViT tokens).
            **options: Further constructor arguments (``k``, ``loss``, ``copies``, ...).

        Returns:
            The module.
        """

        def dotted(inner: Optional[str]) -> Optional[str]:
            if inner is None or not prefix:
                return inner
            return f"{prefix}.{inner}" if inner else prefix

        return cls(
            path.layer,
            in_channels=path.in_channels,
            pool=path.pool,
            reshape=reshape or path.reshape,
            layer_name=dotted(path.layer_name),
            pool_name=dotted(path.pool_name),
            **options,
        )

    @property
    def capture(self) -> FeatureCapture:
        """The capture on the online encoder's feature layer."""
        capture = self.sites[0].capture
        assert capture is not None
        return capture

    @property
    def pooler(self) -> Optional[RationalePooling]:
        """The rationale pooling hook on the online encoder's pool, or None."""
        return self.sites[0].pooler

    @property
    def layer_name(self) -> str:
        """Dotted name of the online encoder's feature layer."""
        return self.sites[0].layer_name

    @property
    def pool_name(self) -> Optional[str]:
        """Dotted name of the online encoder's pool, or None."""
        return self.sites[0].pool_name

    @property
    def pool_names(self) -> List[str]:
        """Dotted names of every pool replaced at inference (online encoder first)."""
        return [s.pool_name for s in self.sites if s.pooler is not None and s.pool_name]

    @property
    def online_decided(self) -> bool:
        """Whether the online encoder is known (else: at the first training step)."""
        return sum(s.capture is not None for s in self.sites) == 1

    def watch(self, model: nn.Module) -> None:
        """Installs a :class:`PoolingCheck` on the wrapped model (if anything pools).

        :func:`release` (or :func:`~lcr_lightly.hooks.remove_hooks` on the model)
        removes it.
        """
        if self.pool_names:
            model.register_forward_hook(PoolingCheck(self))

    def clear(self) -> None:
        """Drops the maps recorded by every capture."""
        for site in self.sites:
            if site.capture is not None:
                site.capture.clear()

    def _decide(self, index: int) -> None:
        """Makes ``sites[index]`` the online encoder and stops capturing the others."""
        chosen = self.sites.pop(index)
        self.sites.insert(0, chosen)
        for site in self.sites[1:]:
            if site.capture is not None:
                site.capture.release()
                site.capture = None
            if site.pooler is not None:
                site.pooler.eval_only = True
        if chosen.pooler is not None:
            chosen.pooler.eval_only = False

    def set_pooling(self, mode: str) -> None:
        """Chooses the inference pooling: ``"gap"`` or ``"rationale"``.

        Args:
            mode: The pooling mode.
        """
        check_choice("pooling", mode, POOLING_MODES)
        if mode == "rationale" and not self.pool_names:
            raise ValueError(
                "Rationale pooling needs a global average pooling module that consumes the "
                f"output of {self.layer_name!r}, and none does (the backbone pools "
                "functionally or tokens). Pass pool=<dotted name or module>, or pool "
                "features yourself with common_rationale.head.pool(feature_map)."
            )
        self.pooling = mode

    def _nonfinite(self, what: str) -> None:
        message = (
            f"LCR: the {what} is not finite (NaN or inf). Lower the learning rate, check "
            "the inputs, or pass nonfinite='skip' to drop such terms with a warning."
        )
        if self.nonfinite == "error":
            raise FloatingPointError(message)
        warnings.warn(message + " Skipped.", RuntimeWarning, stacklevel=3)

    def kl_term(self, ssl_loss: Tensor, check_finite: bool = True) -> Tensor:
        """The fitting loss for the maps captured since the last call.

        Computes GradCAM of ``ssl_loss`` for each captured map, the head's map for the
        same features, and averages :attr:`loss_fn` over the maps (maps the loss does not
        depend on, e.g. extra monitoring forwards, are skipped). Clears the capture.

        Args:
            ssl_loss: The scalar self-supervised loss of this step (a one-element tensor,
                e.g. lightly's ``SwaVLoss`` of shape (1,), counts as a scalar).
            check_finite: Check GradCAM and KL for NaN/inf here (each check waits for the
                device); the wrapped training step passes False and checks the total once.

        Returns:
            The scalar KL term (float32); a zero tensor when a non-finite GradCAM or KL
            was skipped (``nonfinite="skip"``), so ``loss + nu * kl_term(loss)`` always
            works.

        Raises:
            RuntimeError: If no online feature map was captured.
            FloatingPointError: On non-finite values with ``nonfinite="error"``.
        """
        start = _clock(ssl_loss) if self.record else 0.0
        if ssl_loss.dim() != 0 and ssl_loss.numel() == 1:
            ssl_loss = ssl_loss.reshape(())
        live = [i for i, site in enumerate(self.sites) if site.capture is not None]
        outputs: List[Tensor] = []
        owners: List[int] = []
        for i in live:
            capture = self.sites[i].capture
            assert capture is not None
            outputs.extend(capture.outputs)
            owners.extend([i] * len(capture.outputs))
        self.clear()
        names = " or ".join(repr(self.sites[i].layer_name) for i in live)
        if not outputs:
            raise RuntimeError(
                f"LCR captured no feature map with gradient at {names} during this training "
                "step. The hooked layer must be on the online (gradient) path of the SSL loss "
                "and the model must be in training mode; pass layer=<name> if the backbone "
                "attribute is a momentum encoder."
            )
        reshape = self.capture.reshape
        if len(live) > 1:  # online encoder not known yet: the loss path decides
            cams = gradcam(
                ssl_loss, outputs, mode=self.gradcam_mode, allow_unused=True, reshape=reshape
            )
            used = sorted({owners[j] for j, cam in enumerate(cams) if cam is not None})
            if len(used) > 1:
                raise RuntimeError(
                    "The SSL loss depends on the feature maps of several encoders ("
                    + ", ".join(repr(self.sites[i].layer_name) for i in used)
                    + "); LCR trains one head on the online encoder. Freeze the momentum/"
                    "teacher encoder (requires_grad=False or torch.no_grad) or pass layer=."
                )
            if used:
                keep = [j for j, owner in enumerate(owners) if owner == used[0]]
                outputs, cams = [outputs[j] for j in keep], [cams[j] for j in keep]
                self._decide(used[0])
            if self.views == "first":
                outputs, cams = outputs[:1], cams[:1]
        else:
            if self.views == "first":
                outputs = outputs[:1]
            cams = gradcam(
                ssl_loss, outputs, mode=self.gradcam_mode, allow_unused=True, reshape=reshape
            )
        self.batch_size = outputs[0].shape[0]
        maps = [reshape(o) for o in outputs] if reshape is not None else outputs
        pairs = [(f, c) for f, c in zip(maps, cams) if c is not None]
        if not pairs:
            raise RuntimeError(
                f"The SSL loss does not depend on any feature map captured at {names}: the "
                "hooked layer is not on the path from the online views to the loss. Pass "
                "layer=<name> of the online encoder."
            )
        if not self._warned_single_position and all(f[0, 0].numel() == 1 for f, _ in pairs):
            self._warned_single_position = True
            warnings.warn(
                f"LCR: the feature map at {names} is 1x1 (shape {tuple(pairs[0][0].shape)}): "
                "with one position both softmaxes are 1, the KL is exactly 0 and the head "
                "learns nothing. Use larger inputs (a stride-32 backbone needs >= 64 px).",
                RuntimeWarning,
                stacklevel=2,
            )
        if check_finite and not all(torch.isfinite(c).all() for _, c in pairs):
            self._nonfinite("GradCAM of the SSL loss")
            return pairs[0][1].new_zeros(())  # skipped: a zero term keeps `loss + nu * kl` valid
        terms, head_maps = [], []
        for feature, cam in pairs:
            head_map = self.head(feature.detach() if self.detach_features else feature)
            head_maps.append(head_map)
            terms.append(self.loss_fn(head_map, cam))
        kl = torch.stack(terms).mean()
        if check_finite and not torch.isfinite(kl):
            self._nonfinite("LCR KL term")
            return kl.new_zeros(())
        if self.record:
            self.last_step = StepRecord(
                layer_name=self.layer_name,
                maps=[f.detach() for f, _ in pairs],
                gradcams=[c.detach() for _, c in pairs],
                head_maps=[a.detach() for a in head_maps],
                kls=[t.detach() for t in terms],
                kl=kl.detach(),
                ssl_loss=ssl_loss.detach(),
                seconds=_clock(ssl_loss) - start,
            )
        return kl

    def release(self) -> None:
        """Removes the capture and pooling hooks (the model's check: :func:`release`)."""
        for site in self.sites:
            site.release()

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return (
            f"layer={self.layer_name!r}, pool={self.pool_name!r}, pooling={self.pooling!r}, "
            f"detach_features={self.detach_features}, gradcam_mode={self.gradcam_mode!r}, "
            f"views={self.views!r}, nonfinite={self.nonfinite!r}"
        )


def _feature_path(
    root: nn.Module,
    layer: LayerSpec,
    pool: LayerSpec,
    reshape: Optional[Reshape],
    in_channels: Optional[int],
    prefix: str = "",
) -> FeaturePath:
    """:func:`find_feature_path`, with the channels checked against ``in_channels``.

    ``prefix`` is the dotted name of ``root`` in the wrapped model (for messages).

    When the dry forward cannot run (a backbone whose ``forward`` does not take an image
    batch) an explicit ``layer`` and ``in_channels`` are enough, as before the dry
    forward existed: no pool is inferred then.
    """
    try:
        path = find_feature_path(root, layer=layer, pool=pool, reshape=reshape)
    except DryForwardError:
        if layer is None or in_channels is None:
            raise
        layer_name, layer_module = resolve_layer(root, layer)
        pool_name, pool_module = resolve_layer(root, pool) if pool is not None else (None, None)
        return FeaturePath(layer_name, layer_module, pool_name, pool_module, in_channels, ())
    if in_channels is not None and in_channels != path.in_channels:
        raise ValueError(
            f"in_channels={in_channels}, but layer "
            f"{'.'.join(filter(None, (prefix, path.layer_name)))!r} gives maps of shape "
            f"{path.map_shape}: {path.in_channels} channels. Leave in_channels out (it is "
            "read off the dry forward) or pass the right layer=."
        )
    return path


# The keyword options of CommonRationale, which attach and with_common_rationale pass on.
OPTIONS = tuple(p for p in inspect.signature(CommonRationale.__init__).parameters if p != "self")


def attach(
    backbone: nn.Module,
    k: int = 32,
    loss: Optional[GradCAMFitLoss] = None,
    layer: LayerSpec = None,
    pool: LayerSpec = None,
    in_channels: Optional[int] = None,
    reshape: Optional[Reshape] = None,
    **options: Any,
) -> CommonRationale:
    """Attaches LCR to a backbone and returns the :class:`CommonRationale` module.

    The functional entry point for plain PyTorch training loops::

        lcr = attach(backbone, k=32)
        optimizer = SGD([*model.parameters(), *lcr.parameters()], lr=0.03)
        loss = ssl_loss(model, views)            # forward through backbone as usual
        total = loss + 0.01 * lcr.kl_term(loss)  # GradCAM -> head -> KL
        total.backward()

    The feature layer and the pool are found together by one dry forward of the
    backbone (:func:`~lcr_lightly.layers.find_feature_path`): the head is trained on
    exactly the tensor that the global average pool consumes at inference.

    Args:
        backbone: Module containing the feature layer (and its global pooling); its
            ``forward`` takes an image batch.
        k: Number of head projections K.
        loss: The fitting loss; ``GradCAMFitLoss()`` when None.
        layer: Feature layer: None (automatic), dotted name in ``backbone``, or module.
        pool: Global pooling to replace at inference: None (the average pool that
            consumes the layer's output, if any), name or module.
        in_channels: Channels of the feature map; read off the dry forward when None.
        reshape: Callable turning the layer output into a (B, C, H, W) map (inferred
            for recognised ViTs).
        **options: Further :class:`CommonRationale` options (``detach_features``,
            ``gradcam_mode``, ``views``, ``nonfinite``, ``normalize``,
            ``pool_in_training``).

    Returns:
        The attached module (on the backbone's device).

    Raises:
        ValueError: For a bad layer name, a backbone with no map that a global average
            pool consumes (functional or max pooling, a 1x1 map; the message lists the
            candidates), or ``in_channels`` that disagree with the map.
    """
    check_options("attach", options, OPTIONS)
    path = _feature_path(backbone, layer, pool, reshape, in_channels)
    module = CommonRationale.from_path(path, k=k, loss=loss, reshape=reshape, **options)
    _to_backbone(module, backbone)
    return module


def _to_backbone(module: nn.Module, backbone: nn.Module) -> None:
    """Puts LCR's head on the backbone's device, in its dtype if that is floating point.

    A backbone converted as a whole (``.to(torch.bfloat16)``) gives bfloat16 maps,
    which the head must accept; under autocast the parameters stay float32.
    """
    ref = next(backbone.parameters(), None)
    if ref is None:
        return
    module.to(ref.device, ref.dtype if ref.is_floating_point() else None)
