"""Online versus momentum/teacher encoders of a self-supervised model.

LCR trains its head on the maps of the *online* encoder: the one that receives the
gradient of the SSL loss. The attribute called ``backbone`` is not always that encoder:
lightly's DINO benchmark modules keep the teacher in ``backbone`` (frozen in
``on_train_start``) and the student in ``student_backbone``; solo-learn and lightly's
MoCo/BYOL keep the online encoder in ``backbone`` and a momentum copy in
``momentum_backbone``.

The rule, applied by :func:`encoder_group`:

1. The model's *encoders* are its direct children that contain an ``nn.Conv2d`` or are a
   recognised ViT (LCR's own submodule excluded).
2. The *group* is the encoder called ``backbone`` (or the only encoder, or the one named
   by ``layer=``/``pool=``) with every other encoder of the same architecture (the same
   parameter names and shapes): the online encoder and its momentum/teacher copies.
3. The online encoder is the group member with parameters that require gradient. When
   several do (a DINO teacher is frozen only in ``on_train_start``, a ViT teacher may
   run under ``torch.no_grad`` without being frozen) the choice is made at the first
   training step, from the graph: the member whose captured maps the SSL loss depends
   on. Loss-path evidence is what "online" means; names are never used.

Every group member's global pool is replaced by rationale pooling at inference, with
the one head trained on the online encoder's maps: whichever copy ``forward`` evaluates
(DINO evaluates the teacher, an exponential moving average of the student with the same
architecture) pools with the rationale of the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn

from lcr_lightly.layers import has_conv
from lcr_lightly.tokens import find_token_layer

Signature = Tuple[Tuple[str, Tuple[int, ...]], ...]


def is_encoder(module: nn.Module) -> bool:
    """Whether a module is an image encoder: it has a ``Conv2d`` or is a recognised ViT."""
    return has_conv(module) or find_token_layer(module) is not None


def architecture(module: nn.Module) -> Signature:
    """A module's architecture as its parameter names and shapes.

    Momentum and teacher copies share it with the online encoder even when they differ
    in parameter-free modules (e.g. ``DropPath`` in the student, ``Identity`` in the
    teacher of lightly's ViT DINO).
    """
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def trainable(module: nn.Module) -> bool:
    """Whether any parameter of the module requires gradient."""
    return any(p.requires_grad for p in module.parameters())


@dataclass(frozen=True)
class EncoderGroup:
    """The online encoder's candidates and its same-architecture copies.

    Attributes:
        members: Names (children of the model) of every encoder with the group's
            architecture, in registration order.
        online: The members that may be the online encoder (those with parameters that
            require gradient, or all members when none do). One name: decided.
    """

    members: Tuple[str, ...]
    online: Tuple[str, ...]


def encoders(model: nn.Module, exclude: Tuple[str, ...] = ()) -> List[Tuple[str, nn.Module]]:
    """The model's direct children that are image encoders.

    Args:
        model: The SSL model.
        exclude: Child names to skip (LCR's own submodule).

    Returns:
        ``(name, module)`` pairs in registration order.
    """
    return [
        (name, child)
        for name, child in model.named_children()
        if name not in exclude and is_encoder(child)
    ]


def encoder_group(
    model: nn.Module, primary: Optional[str] = None, exclude: Tuple[str, ...] = ()
) -> EncoderGroup:
    """Finds the online encoder's group (see the module docstring for the rule).

    Args:
        model: The SSL model.
        primary: A child name that must be in the group (the encoder holding an
            explicit ``layer=``); ``backbone`` or the only encoder when None.
        exclude: Child names to skip.

    Returns:
        The :class:`EncoderGroup`.

    Raises:
        ValueError: When the model has no encoder, or several of different
            architectures and none called ``backbone``.
    """
    found = encoders(model, exclude)
    children = dict(model.named_children())
    if primary is None:
        names = [n for n, _ in found]
        if "backbone" in children:  # even without a conv: the resolver then says why
            primary = "backbone"
        elif len({architecture(m) for _, m in found}) == 1:
            primary = names[0]
        else:
            listed = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in found) or "none"
            raise ValueError(
                f"{type(model).__name__} has no 'backbone' module and no single image "
                f"encoder (children with a Conv2d or a ViT: {listed}). Pass layer=<dotted "
                "name of the feature map> (e.g. 'encoder.layer4')."
            )
    signature = architecture(children[primary])
    members = [primary] + [n for n, m in found if n != primary and architecture(m) == signature]
    members.sort(key=list(children).index)
    online = [n for n in members if trainable(children[n])] or list(members)
    return EncoderGroup(members=tuple(members), online=tuple(online))


def online_by_loss_path(
    cams: Sequence[Optional[Tensor]], owners: Sequence[int], names: Sequence[str]
) -> Optional[int]:
    """Rule 3 at the first training step: the candidate the SSL loss depends on.

    Args:
        cams: GradCAM of the SSL loss for each captured map (None: the loss does not
            depend on that map).
        owners: For each map, the index of the candidate encoder that produced it.
        names: The candidates' dotted layer names, for the message.

    Returns:
        The index of the online candidate, or None when the loss depends on none.

    Raises:
        RuntimeError: When the loss depends on the maps of several candidates (an
            unfrozen teacher on the gradient path).
    """
    used = sorted({owner for owner, cam in zip(owners, cams) if cam is not None})
    if len(used) > 1:
        raise RuntimeError(
            "The SSL loss depends on the feature maps of several encoders ("
            + ", ".join(repr(names[i]) for i in used)
            + "); LCR trains one head on the online encoder. Freeze the momentum/"
            "teacher encoder (requires_grad=False or torch.no_grad) or pass layer=."
        )
    return used[0] if used else None
