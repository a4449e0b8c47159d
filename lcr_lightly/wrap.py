"""Adding LCR to an existing self-supervised model.

:func:`with_common_rationale` wraps a LightningModule (lightly-style or solo-learn-style:
a ``backbone`` attribute and a ``training_step`` that returns a loss) in place:

* a forward hook on the backbone's last conv stage records the online feature maps;
* ``training_step`` returns ``ssl_loss + weight * KL(GradCAM(ssl_loss), head(F))``;
* ``configure_optimizers`` makes sure the head's parameters are optimised;
* in eval mode a hook on the backbone's global pooling replaces average pooling by
  rationale pooling (switch with :func:`set_pooling`);
* :func:`release` undoes all of it.

Plain ``nn.Module`` models use :func:`attach` and :meth:`CommonRationale.kl_term`
directly (see the README's functional API).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_real
from lcr_lightly.gradcam import GRADCAM_MODES, FeatureCapture, Reshape, gradcam, tokens_to_map
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.hooks import LayerHook, remove_hooks
from lcr_lightly.layers import (
    LayerSpec,
    find_global_pool,
    find_token_layer,
    infer_channels,
    resolve_layer,
)
from lcr_lightly.losses import GradCAMFitLoss, _check_choice

POOLING_MODES = ("gap", "rationale")
VIEWS = ("all", "first")
NONFINITE = ("error", "skip")
SUBMODULE = "common_rationale"


class RationalePooling(LayerHook):
    """Replaces the output of a global pooling module by rationale pooling.

    Active when the pooling module is in eval mode and ``owner.pooling == "rationale"``
    (or in training mode too when ``owner.pool_in_training`` is set, an ablation of the
    paper's failing variant).

    Args:
        pool: The global pooling module that follows the feature layer.
        owner: The :class:`CommonRationale` whose head pools.
    """

    def __init__(self, pool: nn.Module, owner: CommonRationale) -> None:
        self.owner = owner
        super().__init__(pool)

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> Optional[Tensor]:
        """Returns the rationale-pooled features shaped like ``output``."""
        owner = self.owner
        if owner.pooling != "rationale" or (module.training and not owner.pool_in_training):
            return None
        features = args[0] if args else None
        if not isinstance(features, Tensor) or features.dim() != 4:
            return None
        pooled = owner.head.pool(features)
        return pooled.reshape(output.shape).to(output.dtype)


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
        self.pooling = "rationale" if pool is not None else "gap"
        self.capture = FeatureCapture(layer, reshape=reshape)
        self.pooler = RationalePooling(pool, self) if pool is not None else None

    def set_pooling(self, mode: str) -> None:
        """Chooses the inference pooling: ``"gap"`` or ``"rationale"``.

        Args:
            mode: The pooling mode.
        """
        _check_choice("pooling", mode, POOLING_MODES)
        if mode == "rationale" and self.pooler is None:
            raise ValueError(
                "Rationale pooling needs a global pooling module after the feature layer, "
                "and none was found (the backbone pools functionally). Pass pool=<dotted "
                "name or module>, or pool features yourself with model.common_rationale."
                "head.pool(feature_map)."
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
            ssl_loss: The scalar self-supervised loss of this step.
            check_finite: Check GradCAM and KL for NaN/inf here (each check waits for the
                device); the wrapped training step passes False and checks the total once.

        Returns:
            The scalar KL term (float32), or None when it was skipped
            (``nonfinite="skip"``).

        Raises:
            RuntimeError: If no online feature map was captured.
            FloatingPointError: On non-finite values with ``nonfinite="error"``.
        """
        outputs = self.capture.outputs
        self.capture.clear()
        self.batch_size = outputs[0].shape[0] if outputs else 0
        if not outputs:
            raise RuntimeError(
                f"LCR captured no feature map with gradient at {type(self.capture.layer).__name__}"
                " during this training step. The hooked layer must be on the online "
                "(gradient) path of the SSL loss and the model must be in training mode; "
                "pass layer=<name> if the backbone attribute is a momentum encoder."
            )
        if self.views == "first":
            outputs = outputs[:1]
        reshape = self.capture.reshape
        cams = gradcam(
            ssl_loss, outputs, mode=self.gradcam_mode, allow_unused=True, reshape=reshape
        )
        maps = [reshape(o) for o in outputs] if reshape is not None else outputs
        pairs = [(f, c) for f, c in zip(maps, cams) if c is not None]
        if not pairs:
            raise RuntimeError(
                "The SSL loss does not depend on any feature map captured at "
                f"{type(self.capture.layer).__name__}: the hooked layer is not on the path "
                "from the online views to the loss. Pass layer=<name> of the online encoder."
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
        """Removes the capture and pooling hooks."""
        self.capture.release()
        if self.pooler is not None:
            self.pooler.release()

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return (
            f"layer={type(self.capture.layer).__name__}, pooling={self.pooling!r}, "
            f"detach_features={self.detach_features}, gradcam_mode={self.gradcam_mode!r}, "
            f"views={self.views!r}, nonfinite={self.nonfinite!r}"
        )


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

    Args:
        backbone: Module containing the feature layer (and its global pooling).
        k: Number of head projections K.
        loss: The fitting loss; ``GradCAMFitLoss()`` when None.
        layer: Feature layer: None (automatic), dotted name in ``backbone``, or module.
        pool: Global pooling to replace at inference: None (automatic), name or module.
        in_channels: Channels of the feature map; read off the layer when None.
        reshape: Callable turning the layer output into a (B, C, H, W) map.
        **options: Further :class:`CommonRationale` options (``detach_features``,
            ``gradcam_mode``, ``views``, ``nonfinite``, ``normalize``,
            ``pool_in_training``).

    Returns:
        The attached module (move it to the backbone's device with ``.to()``).

    Raises:
        ValueError: For a bad layer name, a backbone with no conv stage, or channels
            that cannot be inferred.
    """
    tokens = find_token_layer(backbone) if layer is None else None
    if tokens is not None:  # a ViT: tokens (B, N, C) -> map (B, C, h, w)
        _, layer_module, width, num_prefix = tokens
        reshape = reshape or functools.partial(tokens_to_map, num_prefix_tokens=num_prefix)
        in_channels = in_channels or width
    else:
        _, layer_module = resolve_layer(backbone, layer)
    if in_channels is None:
        in_channels = infer_channels(layer_module)
        if in_channels is None:
            raise ValueError(
                f"Cannot infer the channels of layer {type(layer_module).__name__}; "
                "pass in_channels=."
            )
    if pool is None and tokens is not None:
        pool_module = None  # ViTs pool tokens functionally: use lcr.head.pool(map)
    elif pool is None:
        found = find_global_pool(backbone, layer_module)
        pool_module = found[1] if found is not None else None
    else:
        pool_module = resolve_layer(backbone, pool)[1]
    module = CommonRationale(
        layer_module,
        in_channels=in_channels,
        k=k,
        loss=loss,
        pool=pool_module,
        reshape=reshape,
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
        lcr.capture.clear()
        output = self.call_original(*args, **kwargs)
        try:
            loss = _loss_of(output)
            if loss is None:
                raise TypeError(
                    f"{type(model).__name__}.training_step returned {type(output).__name__}; "
                    "LCR needs a scalar loss tensor or a dict with a 'loss' tensor."
                )
            if loss.dim() != 0:
                raise TypeError(
                    f"{type(model).__name__}.training_step returned a loss of shape "
                    f"{tuple(loss.shape)}; LCR needs a scalar."
                )
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
            lcr.capture.clear()
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

    Args:
        model: A module with a ``training_step`` returning a scalar loss (or a dict with
            ``"loss"``) and a ``backbone`` attribute (unless ``layer`` is given).
        k: Number of head projections K (paper: 32).
        weight: Weight nu of the KL term (paper: 0.01).
        loss: A :class:`GradCAMFitLoss`; default-constructed when None.
        layer: The feature layer: None (the backbone's last conv stage), a dotted name
            relative to ``model`` (``"backbone.layer4"``), or a module.
        detach_features: Train the head on detached maps so the backbone sees only the
            SSL loss (False: the KL gradient reaches the backbone, as the official code).
        pool: The global pooling to replace at inference: None (automatic), a dotted
            name relative to ``model``, or a module.
        in_channels: Channels of the feature map; read off the layer when None.
        reshape: Callable turning the layer output into (B, C, H, W) (ViT tokens).
        **options: Further :class:`CommonRationale` options.

    Returns:
        The same model (``isinstance`` still holds) with a ``common_rationale``
        submodule.

    Raises:
        ValueError: If the model is already wrapped, has no backbone, or the layer is bad.
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
    if layer is None:
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise ValueError(
                f"{type(model).__name__} has no 'backbone' module; pass layer=<dotted name "
                "of the last conv stage> (e.g. 'encoder.layer4')."
            )
        root: nn.Module = backbone
    else:
        root = model
    pool_module = resolve_layer(model, pool)[1] if isinstance(pool, str) else pool
    lcr = attach(
        root,
        k=k,
        loss=loss,
        layer=layer,
        pool=pool_module,
        weight=weight,
        in_channels=in_channels,
        reshape=reshape,
        detach_features=detach_features,
        **options,
    )
    model.add_module(SUBMODULE, lcr)
    # Instance attributes shadow the class's methods; ``release`` deletes them again.
    model.__dict__["training_step"] = _TrainingStep(model, model.__dict__.get("training_step"))
    if callable(getattr(model, "configure_optimizers", None)):
        original = model.__dict__.get("configure_optimizers")
        model.__dict__["configure_optimizers"] = _ConfigureOptimizers(model, original)
    return model


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
