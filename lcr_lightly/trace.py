"""A dry forward that records what every module of a backbone consumes and returns.

Layer discovery (:mod:`lcr_lightly.layers`) works from how a backbone really runs, not
from how its modules are named or registered: one forward of a small random batch, in
eval mode and without gradient, records for every module call its first input and its
output (the tensor objects and their in-place version counters). The feature layer is
then the module whose output *is* the tensor the global pooling consumes.

The dry forward leaves the backbone as it found it: each module's train/eval mode is
restored, and so is every buffer (BatchNorm running statistics and
``num_batches_tracked`` do not change in eval mode; they are restored anyway, in case a
module updates buffers in eval mode). The global random number generator is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

# Input side of the dry forward of a backbone that declares no size: 64 px gives a 2x2
# map at stride 32 and keeps the dry forward cheap; 224 px is the retry when 64 px fails
# or leaves no spatial map (a fixed-size AvgPool2d(7), a stride-64 network).
DRY_SIZES = ((64, 64), (224, 224))
DRY_BATCH = 2

Size = Tuple[int, int]  # (H, W) of the dry input


class DryForwardError(RuntimeError):
    """The dry forward of a backbone failed at every input size tried."""


@dataclass
class ModuleCall:
    """One call of one module during the dry forward.

    Attributes:
        name: Dotted name of the module inside the traced root ("" for the root).
        module: The module.
        start: Event index of the call's start (starts and ends share one counter, so
            ``a.end < b.start`` means ``b`` started after ``a`` returned).
        end: Event index of the call's return.
        input: The first positional argument if it is a tensor.
        input_version: Its in-place version counter when the call started.
        output: The output tensor (the first element of a tuple/list output).
        output_version: Its version counter when the call returned.
    """

    name: str
    module: nn.Module
    start: int
    end: int = -1
    input: Optional[Tensor] = None
    input_version: int = -1
    output: Optional[Tensor] = None
    output_version: int = -1

    @property
    def depth(self) -> int:
        """Nesting depth of the module (0 for the root's children)."""
        return self.name.count(".") if self.name else -1


@dataclass
class Trace:
    """The module calls of one dry forward, in start order.

    Attributes:
        calls: Every module call.
        images: The random input batch (B, C, S, S).
    """

    calls: List[ModuleCall] = field(default_factory=list)
    images: Optional[Tensor] = None

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of the random input batch."""
        return tuple(self.images.shape) if self.images is not None else ()

    def calls_of(self, module: nn.Module) -> List[ModuleCall]:
        """The calls of one module, in start order."""
        return [c for c in self.calls if c.module is module]

    def producers(self, tensor: Tensor, version: int) -> List[ModuleCall]:
        """The calls that returned exactly ``tensor`` at in-place version ``version``.

        Nested modules that pass a tensor through (a stage returning its last block's
        output, an activation applied in place, an ``Identity``) all return the same
        tensor object; a module whose output was modified in place afterwards returned
        an earlier version and is not a producer of this one.
        """
        return [c for c in self.calls if c.output is tensor and c.output_version == version]


def _first_tensor(value: Any) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def input_channels(root: nn.Module) -> int:
    """Channels of the images a backbone expects: the first ``Conv2d``'s ``in_channels``.

    Args:
        root: The backbone.

    Returns:
        The channel count (3 when the backbone has no ``Conv2d``).
    """
    conv = next((m for m in root.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _pair(size: object) -> Optional[Size]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) >= 2 and isinstance(size[-1], int):
        return int(size[-2]), int(size[-1])
    return None


def declared_size(root: nn.Module) -> Optional[Size]:
    """The input size (H, W) a backbone is built for, when it declares one.

    ViT/Swin patch embeddings were built for ``img_size`` (torchvision's
    ``VisionTransformer``: ``image_size``); other timm models declare the size they were
    trained at in ``pretrained_cfg["input_size"]`` (``default_cfg`` in older versions).
    Other backbones declare nothing.

    Args:
        root: The backbone.

    Returns:
        (H, W) in pixels, or None.
    """
    for module in root.modules():  # the size a patch embedding was built for comes first
        size = getattr(module, "img_size", None)
        size = _pair(size if size is not None else getattr(module, "image_size", None))
        if size is not None:
            return size
    for module in root.modules():
        for cfg in (getattr(module, "pretrained_cfg", None), getattr(module, "default_cfg", None)):
            size = cfg.get("input_size") if isinstance(cfg, dict) else None
            if isinstance(size, (tuple, list)) and len(size) == 3:
                return _pair(size)
    return None


def dry_sizes(root: nn.Module) -> Tuple[Size, ...]:
    """The input sizes (H, W) a dry forward of ``root`` tries, in order.

    The declared size first (a ViT's patch embedding may accept only that one; a timm
    CNN runs there as in use), then :data:`DRY_SIZES`.
    """
    declared = declared_size(root)
    if declared is None:
        return DRY_SIZES
    # patch embeddings of a fixed size refuse every other one
    if any(
        getattr(m, "strict_img_size", False) or hasattr(m, "image_size") for m in root.modules()
    ):
        return (declared,)
    return (declared,) + tuple(s for s in DRY_SIZES if s != declared)


def _reference(root: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for tensor in (*root.parameters(), *root.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def dry_input(root: nn.Module, size: Union[int, Size]) -> Tensor:
    """The seeded random batch of a dry forward, on the device and in the dtype of ``root``.

    Args:
        root: The module the batch is for.
        size: Side, or (H, W), in pixels.

    Returns:
        (DRY_BATCH, C, H, W) with C the channels of ``root``'s first convolution.
    """
    height, width = _pair(size) or (0, 0)
    device, dtype = _reference(root)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(DRY_BATCH, input_channels(root), height, width, generator=generator)
    return x.to(device=device, dtype=dtype)


def trace_forward(root: nn.Module, sizes: Optional[Sequence[Union[int, Size]]] = None) -> Trace:
    """Runs one dry forward of ``root`` and records every module call.

    Eval mode, ``torch.no_grad``, a seeded random batch of ``DRY_BATCH`` images on the
    device and in the dtype of the backbone's parameters. Modes and buffers are
    restored afterwards.

    Args:
        root: The backbone (a module whose ``forward`` takes an image batch).
        sizes: Input sides or (H, W) sizes to try in order until one runs;
            :func:`dry_sizes` when None.

    Returns:
        The recorded calls.

    Raises:
        DryForwardError: If the forward fails at every size.
    """
    if sizes is None:
        sizes = dry_sizes(root)
    errors = []
    for size in sizes:
        try:
            return _trace_once(root, dry_input(root, size))
        except Exception as err:  # noqa: BLE001 - any failure means: try another size
            errors.append(f"{size_text(size)} px: {type(err).__name__}: {err}")
    raise DryForwardError(
        f"The dry forward of {type(root).__name__} (used to find the feature map and the "
        "global pooling) failed: " + "; ".join(errors) + ". Pass layer=, pool= and "
        "in_channels= explicitly."
    )


def size_text(size: Union[int, Size]) -> str:
    """``"64"`` for a square size, ``"32x64"`` otherwise (for messages)."""
    height, width = _pair(size) or (0, 0)
    return str(height) if height == width else f"{height}x{width}"


def _trace_once(root: nn.Module, x: Tensor) -> Trace:
    trace = Trace(images=x)
    open_calls: Dict[int, List[ModuleCall]] = {}
    events = [0]
    handles = []

    def pre_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            call = ModuleCall(name=name, module=module, start=events[0])
            events[0] += 1
            first = args[0] if args else None
            if isinstance(first, Tensor):
                call.input, call.input_version = first, first._version
            trace.calls.append(call)
            open_calls.setdefault(id(module), []).append(call)

        return hook

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        stack = open_calls.get(id(module))
        if not stack:
            return
        call = stack.pop()
        call.end = events[0]
        events[0] += 1
        out = _first_tensor(output)
        if out is not None:
            call.output, call.output_version = out, out._version

    modes = [(m, m.training) for m in root.modules()]
    buffers = [(b, b.detach().clone()) for b in root.buffers()]
    try:
        for name, module in root.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
        root.eval()
        with torch.no_grad():
            root(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return trace
