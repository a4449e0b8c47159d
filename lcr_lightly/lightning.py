"""Adding LCR to an existing self-supervised model.

:func:`with_common_rationale` wraps a LightningModule (lightly-style or solo-learn-style:
a ``backbone`` attribute and a ``training_step`` that returns a loss) in place:

* the feature map and the global average pool are found together by a dry forward at
  wrap time (:func:`lcr_lightly.resolve.resolve`): the head is trained on exactly the
  tensor that the pool consumes at inference;
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

from typing import Any, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from lcr_lightly._validation import check_options
from lcr_lightly.capture import Reshape
from lcr_lightly.hooks import remove_hooks
from lcr_lightly.layers import LayerSpec
from lcr_lightly.losses import GradCAMFitLoss
from lcr_lightly.rationale import OPTIONS, SUBMODULE, CommonRationale, scalar_loss
from lcr_lightly.resolve import resolve


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
        lcr = CommonRationale.of(model)
        lcr.clear()
        output = self.call_original(*args, **kwargs)
        try:
            loss = _loss_of(output)
            if loss is None:
                raise TypeError(
                    f"{type(model).__name__}.training_step returned {type(output).__name__}; "
                    "LCR needs a scalar loss tensor or a dict with a 'loss' tensor."
                )
            loss = scalar_loss(loss, f"{type(model).__name__}.training_step")
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
        total = loss + lcr.weight * kl
        if not torch.isfinite(total):  # the step's only device sync; diagnose below
            if not torch.isfinite(loss):
                lcr.nonfinite_found("SSL loss returned by training_step")
                return None
            lcr.nonfinite_found("LCR KL term (GradCAM of the SSL loss or head map)")
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
        add_missing_params(optimizers, CommonRationale.of(model).parameters())
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
    the global average pool that consumes it (:func:`~lcr_lightly.resolve.resolve`).
    The same layer and pool of the encoder's momentum/teacher copies are hooked too: at
    inference every copy pools with the head, so ``forward`` uses rationale pooling
    whichever copy it evaluates.

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
    check_options("with_common_rationale", options, OPTIONS)
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
    resolution = resolve(model, layer, pool, in_channels, reshape, model=True, exclude=(SUBMODULE,))
    lcr = CommonRationale.from_resolution(resolution, k=k, loss=loss, **options)
    lcr.place_like(model.get_submodule(resolution.sites[0].encoder))
    lcr.watch(model)
    model.add_module(SUBMODULE, lcr)
    # Instance attributes shadow the class's methods; ``release`` deletes them again.
    model.__dict__["training_step"] = _TrainingStep(model, model.__dict__.get("training_step"))
    if callable(getattr(model, "configure_optimizers", None)):
        original = model.__dict__.get("configure_optimizers")
        model.__dict__["configure_optimizers"] = _ConfigureOptimizers(model, original)
    return model


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
    CommonRationale.of(model).set_pooling(mode)
    return model


def release(model: nn.Module) -> CommonRationale:
    """Undoes :func:`with_common_rationale`: hooks, training step, optimisers, submodule.

    Args:
        model: A wrapped model.

    Returns:
        The removed ``common_rationale`` module (holding the trained head).
    """
    lcr = CommonRationale.of(model)
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
    delattr(model, SUBMODULE)
    return lcr
