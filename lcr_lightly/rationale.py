"""The LCR term of one model: capture -> GradCAM -> head -> KL.

:class:`CommonRationale` holds what LCR adds to a model: the head
(:mod:`lcr_lightly.heads`), the fitting loss (:mod:`lcr_lightly.losses`), the sites it
hooks (:mod:`lcr_lightly.resolve`) with a capture of the online encoder's maps
(:mod:`lcr_lightly.capture`) and the pooling hooks (:mod:`lcr_lightly.inference`).
:meth:`CommonRationale.kl_term` turns the maps captured in a step and that step's SSL
loss into the KL term. :func:`lcr_lightly.functional.attach` builds it for a backbone
(plain PyTorch loops), :func:`lcr_lightly.lightning.with_common_rationale` for a
LightningModule, where :meth:`CommonRationale.of` finds it again.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_choice, check_real
from lcr_lightly.capture import FeatureCapture, Reshape
from lcr_lightly.encoders import online_by_loss_path
from lcr_lightly.gradcam import GRADCAM_MODES, gradcam
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.inference import RationaleInference, RationalePooling
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.resolve import FeatureSite, Resolution
from lcr_lightly.step import StepRecord, clock

SUBMODULE = "common_rationale"


VIEWS = ("all", "first")


NONFINITE = ("error", "skip")


def scalar_loss(loss: Tensor, who: str) -> Tensor:
    """A one-element loss (e.g. lightly's ``SwaVLoss``, shape (1,)) as a scalar.

    Raises:
        TypeError: For a loss of several elements, naming ``who`` returned it.
    """
    if loss.dim() == 0:
        return loss
    if loss.numel() != 1:
        raise TypeError(
            f"{who} returned a loss of shape {tuple(loss.shape)}; LCR needs a scalar "
            "(or one element)."
        )
    return loss.reshape(())


class CommonRationale(nn.Module):
    """Everything LCR adds to a model: head, loss, the hooked sites and their pooling.

    Registered as the ``common_rationale`` submodule by :func:`with_common_rationale`,
    so the head's weights are part of the model's ``state_dict``; built by
    :func:`attach` for a backbone. :meth:`of` finds it in a wrapped model.

    Args:
        layer: The feature layer (output (B, C, H, W), or tokens with ``reshape``).
        in_channels: Channels C of the feature map.
        k: Number of head projections K.
        loss: The fitting loss; ``GradCAMFitLoss()`` when None.
        pool: The global pooling module to replace at inference, or None.
        detach_features: Train the head on detached maps and GradCAMs (the backbone then
            sees only the SSL loss); False lets the KL gradient reach the backbone, through
            A and, unless the loss detaches its target, through G (official code).
        gradcam_mode: ``"elementwise"`` (LCR) or ``"channel"`` (classic Grad-CAM).
        views: ``"all"`` online views captured in a step, or only the ``"first"``
            (the official BYOL code).
        nonfinite: ``"error"`` raises on a non-finite SSL loss, GradCAM or KL;
            ``"skip"`` warns and drops the KL term (or the step, if the SSL loss is bad).
        reshape: Callable turning the layer output into a (B, C, H, W) map (ViT
            tokens, channels-last maps).
        normalize: Inference normalisation of the rationale map, ``"image"`` or
            ``"batch"`` (official code; ablation only).
        pool_in_training: Also use rationale pooling in training (a failing variant
            of the paper, for ablation).
        weight: Weight nu of the KL term in ``loss + nu * KL`` (the Lightning wrapper's).
        head_hidden: Hidden width of an MLP head (the paper's failing variant; ablation).
        layer_name: Dotted name of ``layer``, used in messages (its class name if None).
        pool_name: Dotted name of ``pool``, used in messages.
        copies: The same layer and pool in the online encoder's momentum/teacher copies
            (:class:`~lcr_lightly.resolve.FeatureSite`); their pools are replaced at
            inference too, and those marked ``online`` are captured until the first
            training step finds which encoder the SSL loss depends on.
        encoder: The model's child that holds ``layer`` (``""``: a backbone).

    Attributes:
        sites: What is hooked (:class:`~lcr_lightly.resolve.FeatureSite`: layer, pool,
            whether online), the online encoder's first.
        record: Keep what each :meth:`kl_term` computed in :attr:`last_step` (off by
            default: the training step then keeps no reference to its maps).
        last_step: The :class:`StepRecord` of the last recorded step, or None.
        batch_size: Batch size of the maps of the last step (for logging).
        inference: The :class:`~lcr_lightly.inference.RationaleInference` (pooling hooks
            and mode).
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
        encoder: str = "",
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
        self.reshape = reshape
        self.weight = check_real("weight", weight, allow_zero=True)
        self.batch_size = 0
        self.record = False
        self.last_step: Optional[StepRecord] = None
        self._warned_single_position = False
        pool_label = pool_name or (type(pool).__name__ if pool is not None else None)
        online = FeatureSite(
            layer_name or type(layer).__name__, layer, pool_label, pool, True, encoder
        )
        self.sites: Tuple[FeatureSite, ...] = (online, *copies)
        self.captures: List[Optional[FeatureCapture]] = [
            FeatureCapture(s.layer, reshape=reshape, name=s.layer_name) if s.online else None
            for s in self.sites
        ]
        self.inference = RationaleInference(
            self.head,
            [(s.pool_name, s.pool) if s.pool is not None else (None, None) for s in self.sites],
            reshape,
            self.layer_name,
            pool_in_training,
        )

    @classmethod
    def from_resolution(cls, resolution: Resolution, **options: Any) -> CommonRationale:
        """The module for what :func:`~lcr_lightly.resolve.resolve` found (+ ``k``, ``loss``...)."""
        online, *copies = resolution.sites
        return cls(
            online.layer,
            in_channels=resolution.in_channels,
            pool=online.pool,
            reshape=resolution.reshape,
            layer_name=online.layer_name,
            pool_name=online.pool_name,
            copies=copies,
            encoder=online.encoder,
            **options,
        )

    @classmethod
    def of(cls, model: nn.Module) -> CommonRationale:
        """The LCR module of a wrapped model (or the module itself).

        Args:
            model: A model wrapped with :func:`~lcr_lightly.with_common_rationale`, or
                a :class:`CommonRationale` (from :func:`attach`).

        Returns:
            Its :class:`CommonRationale`.

        Raises:
            ValueError: If the model is not wrapped.
        """
        lcr = cls.find(model)
        if lcr is None:
            raise ValueError(
                f"{type(model).__name__} is not wrapped with with_common_rationale "
                f"(no '{SUBMODULE}' submodule)."
            )
        return lcr

    @classmethod
    def find(cls, model: nn.Module) -> Optional[CommonRationale]:
        """Like :meth:`of`, but None for a model that is not wrapped."""
        if isinstance(model, CommonRationale):
            return model
        lcr = getattr(model, SUBMODULE, None)
        return lcr if isinstance(lcr, CommonRationale) else None

    def place_like(self, backbone: nn.Module) -> None:
        """Moves the head to the backbone's device, and dtype if floating point.

        A backbone converted as a whole (``.to(torch.bfloat16)``) gives bfloat16 maps,
        which the head must accept; under autocast the parameters stay float32.
        """
        ref = next(backbone.parameters(), None)
        if ref is not None:
            self.to(ref.device, ref.dtype if ref.is_floating_point() else None)

    @property
    def capture(self) -> FeatureCapture:
        """The capture on the online encoder's feature layer."""
        capture = self.captures[0]
        assert capture is not None
        return capture

    @property
    def pooler(self) -> Optional[RationalePooling]:
        """The rationale pooling hook on the online encoder's pool, or None."""
        return self.inference.hooks[0]

    @property
    def layer(self) -> nn.Module:
        """The online encoder's feature layer."""
        return self.sites[0].layer

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
        return self.inference.pool_names

    @property
    def pooling(self) -> str:
        """The inference pooling, ``"gap"`` or ``"rationale"`` (see :meth:`set_pooling`)."""
        return self.inference.mode

    @property
    def pool_in_training(self) -> bool:
        """Whether rationale pooling is used in training too (ablation)."""
        return self.inference.pool_in_training

    @property
    def online_decided(self) -> bool:
        """Whether the online encoder is known (else: at the first training step)."""
        return sum(c is not None for c in self.captures) == 1

    def set_pooling(self, mode: str) -> None:
        """Chooses the inference pooling, ``"gap"`` or ``"rationale"`` (needs a hooked pool)."""
        self.inference.set_mode(mode)

    @contextlib.contextmanager
    def using_pooling(self, mode: str) -> Iterator[None]:
        """Pools with ``mode`` inside the block, then restores the previous mode."""
        with self.inference.using(mode):
            yield

    def watch(self, model: nn.Module) -> None:
        """Warns when ``model(x)`` in eval mode runs none of the hooked pools (until release)."""
        self.inference.watch(model)

    def clear(self) -> None:
        """Drops the maps recorded by every capture."""
        for capture in self.captures:
            if capture is not None:
                capture.clear()

    def nonfinite_found(self, what: str) -> None:
        """Applies the ``nonfinite`` policy to a NaN/inf ``what``: raise, or warn.

        Raises:
            FloatingPointError: With ``nonfinite="error"``.
        """
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
            RuntimeError: If no online feature map was captured, or the loss depends on
                none of them.
            FloatingPointError: On non-finite values with ``nonfinite="error"``.
        """
        start = clock(ssl_loss) if self.record else 0.0
        ssl_loss = scalar_loss(ssl_loss, "kl_term's ssl_loss")
        outputs, owners = self._captured()
        decided = self.online_decided
        if decided and self.views == "first":  # GradCAM of the first view only
            outputs, owners = outputs[:1], owners[:1]
        cams = gradcam(
            ssl_loss, outputs, mode=self.gradcam_mode, allow_unused=True, reshape=self.reshape
        )
        if not decided:
            outputs, cams = self._decide(outputs, owners, cams)
        pairs = self._pairs(outputs, cams)
        if check_finite and not all(torch.isfinite(c).all() for _, c in pairs):
            self.nonfinite_found("GradCAM of the SSL loss")
            return pairs[0][1].new_zeros(())  # skipped: a zero term keeps `loss + nu * kl` valid
        if self.detach_features:  # neither A nor G passes the KL gradient to the backbone
            pairs = [(f.detach(), c.detach()) for f, c in pairs]
        head_maps = [self.head(f) for f, _ in pairs]
        terms = [self.loss_fn(a, c) for a, (_, c) in zip(head_maps, pairs)]
        kl = torch.stack(terms).mean()
        if check_finite and not torch.isfinite(kl):
            self.nonfinite_found("LCR KL term")
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
                seconds=clock(ssl_loss) - start,
            )
        return kl

    def _live_names(self) -> str:
        return " or ".join(repr(s.layer_name) for s, c in zip(self.sites, self.captures) if c)

    def _captured(self) -> Tuple[List[Tensor], List[int]]:
        """The maps recorded since the last step and the index of the site of each."""
        outputs: List[Tensor] = []
        owners: List[int] = []
        for i, capture in enumerate(self.captures):
            if capture is not None:
                outputs.extend(capture.outputs)
                owners.extend([i] * len(capture.outputs))
        self.clear()
        if not outputs:
            raise RuntimeError(
                f"LCR captured no feature map with gradient at {self._live_names()} during "
                "this training step. The hooked layer must be on the online (gradient) path "
                "of the SSL loss and the model must be in training mode; pass layer=<name> "
                "if the backbone attribute is a momentum encoder."
            )
        self.batch_size = outputs[0].shape[0]
        return outputs, owners

    def _decide(
        self, outputs: List[Tensor], owners: List[int], cams: List[Optional[Tensor]]
    ) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
        """First step with several candidates: keeps the maps of the one on the loss path."""
        chosen = online_by_loss_path(cams, owners, [s.layer_name for s in self.sites])
        if chosen is not None:
            keep = [j for j, owner in enumerate(owners) if owner == chosen]
            outputs, cams = [outputs[j] for j in keep], [cams[j] for j in keep]
            order = [chosen] + [i for i in range(len(self.sites)) if i != chosen]
            self.sites = tuple(replace(self.sites[i], online=i == chosen) for i in order)
            for i in order[1:]:
                capture = self.captures[i]
                if capture is not None:
                    capture.release()
            self.captures = [self.captures[chosen]] + [None] * (len(order) - 1)
            self.inference.make_online(chosen)
        if self.views == "first":
            outputs, cams = outputs[:1], cams[:1]
        return outputs, cams

    def _pairs(
        self, outputs: List[Tensor], cams: List[Optional[Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """(map, GradCAM) for each map the loss depends on; warns once on 1x1 maps."""
        maps = [self.reshape(o) for o in outputs] if self.reshape is not None else outputs
        pairs = [(f, c) for f, c in zip(maps, cams) if c is not None]
        if not pairs:
            raise RuntimeError(
                "The SSL loss does not depend on any feature map captured at "
                f"{self._live_names()}: the hooked layer is not on the path from the online "
                "views to the loss. Pass layer=<name> of the online encoder."
            )
        if not self._warned_single_position and all(f[0, 0].numel() == 1 for f, _ in pairs):
            self._warned_single_position = True
            warnings.warn(
                f"LCR: the feature map at {self._live_names()} is 1x1 (shape "
                f"{tuple(pairs[0][0].shape)}): with one position both softmaxes are 1, the "
                "KL is exactly 0 and the head learns nothing. Use larger inputs (a "
                "stride-32 backbone needs >= 64 px).",
                RuntimeWarning,
                stacklevel=3,
            )
        return pairs

    def release(self) -> None:
        """Removes the capture and pooling hooks (the model's check: :func:`release`)."""
        for capture in self.captures:
            if capture is not None:
                capture.release()
        self.inference.release()

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return (
            f"layer={self.layer_name!r}, pool={self.pool_name!r}, pooling={self.pooling!r}, "
            f"detach_features={self.detach_features}, gradcam_mode={self.gradcam_mode!r}, "
            f"views={self.views!r}, nonfinite={self.nonfinite!r}"
        )


# The keyword options of CommonRationale that attach and with_common_rationale pass on
# (the layer, pool, names and copies come from the resolver).
OPTIONS = (
    "detach_features",
    "gradcam_mode",
    "views",
    "nonfinite",
    "normalize",
    "pool_in_training",
    "weight",
    "head_hidden",
)
