"""Adding LCR to an existing self-supervised model.

:func:`with_common_rationale` wraps a LightningModule (lightly-style or solo-learn-style:
a ``backbone`` attribute and a ``training_step`` that returns a loss) in place:

* the feature map and the global average pool are found together by a dry forward at
  wrap time (:func:`lcr_lightly.layers.find_feature_path`): the head is trained on
  exactly the tensor that the pool consumes at inference;
* a forward hook on that layer of the online encoder records its feature maps
  (:mod:`lcr_lightly.encoders` says which encoder is online when the model also has a
  momentum or teacher copy);
* ``training_step`` returns ``ssl_loss + weight * KL(GradCAM(ssl_loss), head(F))``;
* ``configure_optimizers`` makes sure the head's parameters are optimised;
* in eval mode hooks on the pool of the online encoder and of its copies replace average
  pooling by rationale pooling (switch with :func:`set_pooling`); a forward ``model(x)``
  in eval mode that runs none of them warns;
* :func:`release` undoes all of it.

Plain ``nn.Module`` models use :func:`attach` and :meth:`CommonRationale.kl_term`
directly (see the README's functional API).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_real
from lcr_lightly.encoders import encoder_group
from lcr_lightly.gradcam import GRADCAM_MODES, FeatureCapture, Reshape, gradcam
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.hooks import LayerHook, OwnedHook, remove_hooks
from lcr_lightly.layers import FeaturePath, LayerSpec, find_feature_path, resolve_layer
from lcr_lightly.losses import GradCAMFitLoss, _check_choice
from lcr_lightly.tracing import DryForwardError

POOLING_MODES = ("gap", "rationale")
VIEWS = ("all", "first")
NONFINITE = ("error", "skip")
SUBMODULE = "common_rationale"


class RationalePooling(LayerHook):
    """Replaces the output of a global pooling module by rationale pooling.

    Active when the pooling module is in eval mode and ``owner.pooling == "rationale"``
    (or in training mode too when ``owner.pool_in_training`` is set, an ablation of the
    paper's failing variant; never for a momentum/teacher copy, ``eval_only``).

    Args:
        pool: The global average pool that consumes the feature map.
        owner: The :class:`CommonRationale` whose head pools.
        eval_only: Never pool in training mode (pools of momentum/teacher copies).
    """

    def __init__(self, pool: nn.Module, owner: CommonRationale, eval_only: bool = False) -> None:
        self.owner = owner
        self.eval_only = eval_only
        super().__init__(pool)

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> Optional[Tensor]:
        """Returns the rationale-pooled features shaped like ``output``."""
        owner = self.owner
        if owner.pooling != "rationale":
            return None
        if module.training and (self.eval_only or not owner.pool_in_training):
            return None
        features = args[0] if args else None
        if not isinstance(features, Tensor) or features.dim() != 4:
            return None
        owner.pool_calls += 1
        pooled = owner.head.pool(features)
        return pooled.reshape(output.shape).to(output.dtype)


class PoolingCheck(OwnedHook):
    """Warns when ``model(x)`` in eval mode with rationale pooling ran none of the pools.

    A forward hook on the wrapped model: ``set_pooling("rationale")`` is then never a
    silent no-op (a ``forward`` that evaluates an encoder LCR did not hook, or pools
    functionally, warns). O(1) per call. A copy of the model gets a copy of the check
    that watches the copy's own ``common_rationale``.

    Args:
        owner: The model's :class:`CommonRationale`.
    """

    def __init__(self, owner: CommonRationale) -> None:
        self.owner = owner

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Warns if no rationale pooling happened since the previous call."""
        owner = self.owner
        pooled = owner.pool_calls != owner.pool_calls_seen
        owner.pool_calls_seen = owner.pool_calls
        if module.training or owner.pooling != "rationale" or pooled:
            return
        pools = ", ".join(map(repr, owner.pool_names))
        warnings.warn(
            f"{type(module).__name__}(x) ran in eval mode with rationale pooling, but none of "
            f"the pools LCR hooks ({pools}) ran: its output is not "
            "rationale-pooled. Its forward evaluates another encoder or pools functionally; "
            "pool the feature map with common_rationale.head.pool(map), or pass pool=.",
            RuntimeWarning,
            stacklevel=2,
        )


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
        _check_choice("gradcam_mode", gradcam_mode, GRADCAM_MODES)
        _check_choice("views", views, VIEWS)
        _check_choice("nonfinite", nonfinite, NONFINITE)
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
        _check_choice("pooling", mode, POOLING_MODES)
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

    def kl_term(self, ssl_loss: Tensor, check_finite: bool = True) -> Optional[Tensor]:
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
            The scalar KL term (float32), or None when it was skipped
            (``nonfinite="skip"``).

        Raises:
            RuntimeError: If no online feature map was captured.
            FloatingPointError: On non-finite values with ``nonfinite="error"``.
        """
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
        if check_finite and not all(torch.isfinite(c).all() for _, c in pairs):
            self._nonfinite("GradCAM of the SSL loss")
            return None
        terms = []
        for feature, cam in pairs:
            head_map = self.head(feature.detach() if self.detach_features else feature)
            terms.append(self.loss_fn(head_map, cam))
        kl = torch.stack(terms).mean()
        if check_finite and not torch.isfinite(kl):
            self._nonfinite("LCR KL term")
            return None
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
) -> FeaturePath:
    """:func:`find_feature_path`, with the channels checked against ``in_channels``.

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
            f"in_channels={in_channels}, but layer {path.layer_name!r} gives maps of shape "
            f"{path.map_shape}: {path.in_channels} channels. Leave in_channels out (it is "
            "read off the dry forward) or pass the right layer=."
        )
    return path


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
    path = _feature_path(backbone, layer, pool, reshape, in_channels)
    module = CommonRationale(
        path.layer,
        in_channels=path.in_channels,
        k=k,
        loss=loss,
        pool=path.pool,
        reshape=reshape or path.reshape,
        layer_name=path.layer_name,
        pool_name=path.pool_name,
        **options,
    )
    ref = next(backbone.parameters(), None)
    if ref is not None:
        module.to(ref.device)
    return module


def _loss_of(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


class _MethodWrapper:
    """Base of the instance-level method wrappers; ``__wrapped__`` is the original.

    Lightning (``is_overridden``) and ``inspect`` follow ``__wrapped__``.
    """

    name = ""

    def __init__(self, model: nn.Module, original: Any) -> None:
        self.model = model
        self.original = original  # an instance-level override, or None

    @property
    def __wrapped__(self) -> Any:
        return self.original if self.original is not None else getattr(type(self.model), self.name)

    def call_original(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the model's own method."""
        if self.original is not None:
            return self.original(*args, **kwargs)
        return getattr(type(self.model), self.name)(self.model, *args, **kwargs)


class _TrainingStep(_MethodWrapper):
    """The wrapped ``training_step``: SSL step, then the LCR term."""

    name = "training_step"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        lcr: CommonRationale = getattr(model, SUBMODULE)
        lcr.clear()
        output = self.call_original(*args, **kwargs)
        try:
            loss = _loss_of(output)
            if loss is None:
                raise TypeError(
                    f"{type(model).__name__}.training_step returned {type(output).__name__}; "
                    "LCR needs a scalar loss tensor or a dict with a 'loss' tensor."
                )
            if loss.dim() != 0:
                if loss.numel() != 1:
                    raise TypeError(
                        f"{type(model).__name__}.training_step returned a loss of shape "
                        f"{tuple(loss.shape)}; LCR needs a scalar (or one element)."
                    )
                loss = loss.reshape(())  # e.g. lightly's SwaVLoss returns shape (1,)
            try:
                kl = lcr.kl_term(loss, check_finite=False)
            except RuntimeError as err:
                if _is_compiled(model):
                    raise RuntimeError(
                        "LCR cannot take the GradCAM of a feature map inside a torch.compile'd "
                        "module: the map its hook sees is not on the compiled graph's gradient "
                        "path. Keep the backbone in eager mode (compile the heads only, e.g. "
                        "model.projection_head = torch.compile(model.projection_head))."
                    ) from err
                raise
        finally:
            lcr.clear()
        assert kl is not None  # only None when checked and skipped
        total = loss + lcr.weight * kl
        if not torch.isfinite(total):  # the step's only device sync; diagnose below
            if not torch.isfinite(loss):
                lcr._nonfinite("SSL loss returned by training_step")
                return None
            lcr._nonfinite("LCR KL term (GradCAM of the SSL loss or head map)")
            return output
        log = getattr(model, "log", None)
        if getattr(model, "_trainer", None) is not None and callable(log):
            log("train_lcr_kl", kl.detach(), prog_bar=True, batch_size=lcr.batch_size)
        if isinstance(output, dict):
            output = dict(output)
            output["loss"] = total
            return output
        return total


def _is_compiled(model: nn.Module) -> bool:
    """Whether the model or one of its submodules is compiled with torch.compile."""
    return any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def _optimizers(obj: Any) -> List[torch.optim.Optimizer]:
    if isinstance(obj, torch.optim.Optimizer):
        return [obj]
    if isinstance(obj, dict):
        return [o for v in obj.values() for o in _optimizers(v)]
    if isinstance(obj, (list, tuple)):
        return [o for v in obj for o in _optimizers(v)]
    return []


def add_missing_params(
    optimizers: Sequence[torch.optim.Optimizer], params: Iterable[nn.Parameter]
) -> int:
    """Adds parameters that no optimizer holds to the first group of the first one.

    Joining an existing group (rather than adding a group) keeps every learning-rate
    scheduler built for the optimizer valid.

    Args:
        optimizers: The optimizers returned by ``configure_optimizers``.
        params: Parameters that must be optimised.

    Returns:
        How many parameters were added.
    """
    held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    missing = [p for p in params if p.requires_grad and id(p) not in held]
    if missing and optimizers:
        optimizers[0].param_groups[0]["params"].extend(missing)
    return len(missing)


class _ConfigureOptimizers(_MethodWrapper):
    """The wrapped ``configure_optimizers``: adds the head's parameters if missing."""

    name = "configure_optimizers"

    def __call__(self) -> Any:
        model = self.model
        result = self.call_original()
        optimizers = _optimizers(result)
        if not optimizers:
            raise TypeError(
                f"{type(model).__name__}.configure_optimizers returned no torch optimizer; "
                "LCR cannot add the head's parameters. Add "
                "model.common_rationale.parameters() to your optimizer yourself."
            )
        add_missing_params(optimizers, getattr(model, SUBMODULE).parameters())
        return result


def with_common_rationale(
    model: nn.Module,
    k: int = 32,
    weight: float = 0.01,
    loss: Optional[GradCAMFitLoss] = None,
    layer: LayerSpec = None,
    detach_features: bool = False,
    pool: LayerSpec = None,
    in_channels: Optional[int] = None,
    reshape: Optional[Reshape] = None,
    **options: Any,
) -> nn.Module:
    """Adds Learning Common Rationale to a self-supervised LightningModule, in place.

    Without ``layer``/``pool``: the online encoder is found among the model's encoders
    (:mod:`lcr_lightly.encoders`: ``backbone``, or DINO's ``student_backbone`` when
    ``backbone`` is the teacher), and one dry forward of it finds the feature map and
    the global average pool that consumes it
    (:func:`~lcr_lightly.layers.find_feature_path`). The same layer and pool of the
    encoder's momentum/teacher copies are hooked too: at inference every copy pools
    with the head, so ``forward`` uses rationale pooling whichever copy it evaluates.

    Args:
        model: A module with a ``training_step`` returning a scalar (or one-element)
            loss, or a dict with ``"loss"``, and an image encoder among its children.
        k: Number of head projections K (paper: 32).
        weight: Weight nu of the KL term (paper: 0.01).
        loss: A :class:`GradCAMFitLoss`; default-constructed when None.
        layer: The feature layer: None (automatic), a dotted name relative to ``model``
            (``"backbone.layer4"``), or a module. Its encoder is then the online one.
        detach_features: Train the head on detached maps so the backbone sees only the
            SSL loss (False: the KL gradient reaches the backbone, as the official code).
        pool: The global pooling to replace at inference: None (the average pool that
            consumes the layer's output), a dotted name relative to ``model``, or a
            module. Given alone, the layer is the module that returns its input.
        in_channels: Channels of the feature map; read off the dry forward when None.
        reshape: Callable turning the layer output into (B, C, H, W) (inferred for
            recognised ViTs).
        **options: Further :class:`CommonRationale` options.

    Returns:
        The same model (``isinstance`` still holds) with a ``common_rationale``
        submodule.

    Raises:
        ValueError: If the model is already wrapped, has no image encoder, the layer is
            bad, or no global average pool consumes a map (functional or max pooling, 1x1
            map; the message lists candidates and says what to pass).
        TypeError: If the model has no ``training_step``.
    """
    if hasattr(model, SUBMODULE):
        raise ValueError(
            f"{type(model).__name__} already has a '{SUBMODULE}' submodule: it is wrapped "
            "already. Call lcr_lightly.release(model) before wrapping again."
        )
    if not callable(getattr(model, "training_step", None)):
        raise TypeError(
            f"{type(model).__name__} has no training_step. with_common_rationale wraps "
            "LightningModule-style models; for a plain nn.Module use lcr_lightly.attach("
            "backbone) and add lcr.kl_term(loss) to your loss (see the README)."
        )
    if getattr(model, "automatic_optimization", True) is False:
        raise ValueError(
            f"{type(model).__name__} uses manual optimisation; its training_step calls "
            "backward itself, so the LCR term cannot be added afterwards. Use "
            "lcr_lightly.attach(model.backbone) and add lcr.kl_term(loss) before backward."
        )
    options = dict(options, weight=weight, detach_features=detach_features)
    lcr = _attach_to_model(model, k, loss, layer, pool, in_channels, reshape, options)
    lcr.watch(model)
    model.add_module(SUBMODULE, lcr)
    # Instance attributes shadow the class's methods; ``release`` deletes them again.
    model.__dict__["training_step"] = _TrainingStep(model, model.__dict__.get("training_step"))
    if callable(getattr(model, "configure_optimizers", None)):
        original = model.__dict__.get("configure_optimizers")
        model.__dict__["configure_optimizers"] = _ConfigureOptimizers(model, original)
    return model


def _attach_to_model(
    model: nn.Module,
    k: int,
    loss: Optional[GradCAMFitLoss],
    layer: LayerSpec,
    pool: LayerSpec,
    in_channels: Optional[int],
    reshape: Optional[Reshape],
    options: Dict[str, Any],
) -> CommonRationale:
    """Finds the online encoder's group, traces one member and hooks them all."""
    children = dict(model.named_children())
    explicit = layer if layer is not None else pool
    if explicit is None:
        group = encoder_group(model, exclude=(SUBMODULE,))
        primary, online = group.online[0], group.online
        rel_layer: LayerSpec = None
        rel_pool: LayerSpec = None
    else:
        name = resolve_layer(model, explicit)[0]
        if not name:
            raise ValueError(f"layer=/pool= must name a module inside {type(model).__name__}.")
        primary = name.split(".")[0]
        group = encoder_group(model, primary=primary, exclude=(SUBMODULE,))
        online = (primary,)  # the user named the online encoder

        def relative(spec: LayerSpec) -> LayerSpec:
            if spec is None:
                return None
            full = resolve_layer(model, spec)[0]
            if full != primary and not full.startswith(primary + "."):
                raise ValueError(f"layer= and pool= must be in the same encoder ({primary!r}).")
            return full[len(primary) + 1 :] if full != primary else ""

        rel_layer, rel_pool = relative(layer), relative(pool)
    path = _feature_path(children[primary], rel_layer, rel_pool, reshape, in_channels)

    def dotted(encoder: str, inner: Optional[str]) -> Optional[str]:
        if inner is None:
            return None
        return f"{encoder}.{inner}" if inner else encoder

    copies: List[FeatureSite] = []
    for member in group.members:
        if member == primary:
            continue
        modules = dict(children[member].named_modules())
        copy_layer = modules.get(path.layer_name)
        copy_pool = modules.get(path.pool_name) if path.pool_name is not None else None
        if copy_layer is None or type(copy_layer) is not type(path.layer):
            continue
        copies.append(
            FeatureSite(
                dotted(member, path.layer_name) or member,
                copy_layer,
                dotted(member, path.pool_name) if copy_pool is not None else None,
                copy_pool,
                member in online,
            )
        )
    lcr = CommonRationale(
        path.layer,
        in_channels=path.in_channels,
        k=k,
        loss=loss,
        pool=path.pool,
        reshape=reshape or path.reshape,
        layer_name=dotted(primary, path.layer_name),
        pool_name=dotted(primary, path.pool_name),
        copies=copies,
        **options,
    )
    ref = next(children[primary].parameters(), None)
    if ref is not None:
        lcr.to(ref.device)
    return lcr


def _lcr_of(model: nn.Module) -> CommonRationale:
    lcr = getattr(model, SUBMODULE, None)
    if isinstance(model, CommonRationale):
        return model
    if not isinstance(lcr, CommonRationale):
        raise ValueError(
            f"{type(model).__name__} is not wrapped with with_common_rationale "
            f"(no '{SUBMODULE}' submodule)."
        )
    return lcr


def set_pooling(model: nn.Module, mode: str) -> nn.Module:
    """Switches a wrapped model's inference pooling between ``"gap"`` and ``"rationale"``.

    One checkpoint then gives both the baseline (global average pooling) and the LCR
    (rationale-weighted) representation.

    Args:
        model: A wrapped model (or its ``common_rationale`` module).
        mode: ``"gap"`` or ``"rationale"``.

    Returns:
        The model.
    """
    _lcr_of(model).set_pooling(mode)
    return model


def release(model: nn.Module) -> CommonRationale:
    """Undoes :func:`with_common_rationale`: hooks, training step, optimisers, submodule.

    Args:
        model: A wrapped model.

    Returns:
        The removed ``common_rationale`` module (holding the trained head).
    """
    lcr = _lcr_of(model)
    lcr.release()
    remove_hooks(model)
    for name, wrapper in (
        ("training_step", _TrainingStep),
        ("configure_optimizers", _ConfigureOptimizers),
    ):
        current = model.__dict__.get(name)
        if isinstance(current, wrapper):
            if current.original is not None:
                setattr(model, name, current.original)
            else:
                delattr(model, name)
    del model._modules[SUBMODULE]
    return lcr


def state_summary(model: nn.Module) -> Dict[str, Any]:
    """A short description of a wrapped model's LCR settings (for logs and configs).

    Args:
        model: A wrapped model.

    Returns:
        A dict of settings.
    """
    lcr = _lcr_of(model)
    return {
        "k": lcr.head.k,
        "in_channels": lcr.head.in_channels,
        "weight": lcr.weight,
        "pooling": lcr.pooling,
        "loss": lcr.loss_fn.extra_repr(),
        "detach_features": lcr.detach_features,
        "gradcam_mode": lcr.gradcam_mode,
        "views": lcr.views,
    }
