"""Rationale pooling at inference: the hooks on the global pools, the mode and its check.

At inference ``model(x)`` should return rationale-pooled features without any edit of
the model: a :class:`RationalePooling` hook on every pool LCR resolved (the online
encoder's and its momentum/teacher copies') replaces the pool's output by the head's
pooling of the pool's input. :class:`RationaleInference` owns those hooks, the pooling
mode (``"gap"`` or ``"rationale"``, switched by :meth:`RationaleInference.set_mode`) and
the counters with which :class:`PoolingCheck` warns when a forward in eval mode ran none
of the hooked pools. The pooling arithmetic itself is in :mod:`lcr_lightly.pooling`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from lcr_lightly._validation import check_choice
from lcr_lightly.capture import Reshape
from lcr_lightly.heads import CommonRationaleHead
from lcr_lightly.hooks import LayerHook, OwnedHook

POOLING_MODES = ("gap", "rationale")


class RationalePooling(LayerHook):
    """Replaces the output of a global pooling module by rationale pooling.

    Active when the pool is in eval mode and the owner's mode is ``"rationale"`` (or in
    training mode too when ``owner.pool_in_training`` is set, an ablation of the paper's
    failing variant; never for a momentum/teacher copy, ``eval_only``).

    Args:
        pool: The global average pool that consumes the feature map.
        owner: The :class:`RationaleInference` whose head pools.
        eval_only: Never pool in training mode (pools of momentum/teacher copies).
    """

    def __init__(self, pool: nn.Module, owner: RationaleInference, eval_only: bool) -> None:
        self.owner = owner
        self.eval_only = eval_only
        super().__init__(pool)

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> Optional[Tensor]:
        """Returns the rationale-pooled features shaped like ``output``."""
        owner = self.owner
        if owner.mode != "rationale":
            return None
        if module.training and (self.eval_only or not owner.pool_in_training):
            return None
        features = args[0] if args else None
        if not isinstance(features, Tensor) or features.dim() != 4:
            return None
        owner.calls += 1
        fmap = owner.reshape(features) if owner.reshape is not None else features
        return owner.head.pool(fmap).reshape(output.shape).to(output.dtype)


class PoolingCheck(OwnedHook):
    """Warns when ``model(x)`` in eval mode with rationale pooling ran none of the pools.

    A forward hook on the wrapped model: ``set_pooling("rationale")`` is then never a
    silent no-op (a ``forward`` that evaluates an encoder LCR did not hook, or pools
    functionally, warns). O(1) per call. A copy of the model gets a copy of the check
    that watches the copy's own ``common_rationale``.

    Args:
        owner: The model's :class:`RationaleInference`.
    """

    def __init__(self, owner: RationaleInference) -> None:
        self.owner = owner

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        """Warns if no rationale pooling happened since the previous call."""
        owner = self.owner
        pooled = owner.calls != owner.calls_seen
        owner.calls_seen = owner.calls
        if module.training or owner.mode != "rationale" or pooled:
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


class RationaleInference:
    """The pooling hooks of one :class:`~lcr_lightly.CommonRationale`, and its mode.

    Args:
        head: The head whose ``pool`` replaces average pooling.
        pools: Per hooked site, online encoder first: ``(dotted name, pool module)``,
            or ``(None, None)`` where the site has no pool.
        reshape: Turns a pool's input into (B, C, H, W) (channels-last maps), or None.
        layer_name: The online feature layer, for messages.
        pool_in_training: Also pool with the rationale in training (ablation).

    Attributes:
        mode: ``"rationale"`` when a pool is hooked, else ``"gap"``.
        hooks: Per site, its :class:`RationalePooling` or None.
        calls: Rationale poolings done (read by :class:`PoolingCheck`).
        calls_seen: ``calls`` at the end of the model's previous forward.
    """

    def __init__(
        self,
        head: CommonRationaleHead,
        pools: Sequence[Tuple[Optional[str], Optional[nn.Module]]],
        reshape: Optional[Reshape],
        layer_name: str,
        pool_in_training: bool = False,
    ) -> None:
        self.head = head
        self.reshape = reshape
        self.layer_name = layer_name
        self.pool_in_training = pool_in_training
        self.names = [name for name, _ in pools]
        self.hooks: List[Optional[RationalePooling]] = [
            RationalePooling(module, self, eval_only=i > 0) if module is not None else None
            for i, (_, module) in enumerate(pools)
        ]
        self.mode = "rationale" if self.pool_names else "gap"
        self.calls = 0
        self.calls_seen = 0

    @property
    def pool_names(self) -> List[str]:
        """Dotted names of the hooked pools, the online encoder's first."""
        return [n for n, h in zip(self.names, self.hooks) if h is not None and n is not None]

    def set_mode(self, mode: str) -> None:
        """Chooses the inference pooling: ``"gap"`` or ``"rationale"``.

        Raises:
            ValueError: For an unknown mode, or ``"rationale"`` with no pool hooked.
        """
        check_choice("pooling", mode, POOLING_MODES)
        if mode == "rationale" and not self.pool_names:
            raise ValueError(
                "Rationale pooling needs a global average pooling module that consumes the "
                f"output of {self.layer_name!r}, and none does (the backbone pools "
                "functionally or tokens). Pass pool=<dotted name or module>, or pool "
                "features yourself with common_rationale.head.pool(feature_map)."
            )
        self.mode = mode

    @contextlib.contextmanager
    def using(self, mode: str) -> Iterator[None]:
        """Pools with ``mode`` inside the block, then restores the previous mode."""
        previous = self.mode
        self.set_mode(mode)
        try:
            yield
        finally:
            self.mode = previous

    def make_online(self, index: int) -> None:
        """Moves site ``index`` first: its pool may pool in training, the others never."""
        self.names.insert(0, self.names.pop(index))
        self.hooks.insert(0, self.hooks.pop(index))
        for i, hook in enumerate(self.hooks):
            if hook is not None:
                hook.eval_only = i > 0

    def watch(self, model: nn.Module) -> None:
        """Installs a :class:`PoolingCheck` on the wrapped model (if anything pools)."""
        if self.pool_names:
            model.register_forward_hook(PoolingCheck(self))

    def release(self) -> None:
        """Removes the pooling hooks."""
        for hook in self.hooks:
            if hook is not None:
                hook.release()
