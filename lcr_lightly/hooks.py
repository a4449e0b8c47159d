"""Forward hooks that survive ``copy.deepcopy`` and pickling without leaking.

``copy.deepcopy`` copies a module's forward hooks together with the module. A plain
bound-method hook would make a momentum backbone copied after wrapping feed a copy of
our state. Here the hook registered on a module is a :class:`_WeakHook`: it copies and
pickles as a dead hook, and the owning :class:`LayerHook` re-registers itself on its own
(copied) module when it is copied or unpickled as part of a whole model.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Optional, TypeVar

from torch import nn
from torch.utils.hooks import RemovableHandle


class _WeakHook:
    """A forward hook that calls an owner it does not keep alive; copies are dead."""

    def __init__(self, owner: Optional[LayerHook]) -> None:
        self.ref = weakref.ref(owner) if owner is not None else None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        owner = self.ref() if self.ref is not None else None
        if owner is None or module is not owner.module:
            return None
        return owner.on_forward(module, args, output)

    def __reduce__(self) -> Any:
        return (_WeakHook, (None,))


class OwnedHook:
    """A forward hook object that copies and pickles together with its module.

    For hooks on the wrapped model itself: a copy of the model gets a working copy of
    the hook (holding the copy's state, e.g. its own ``common_rationale``), with nothing
    to re-register. Subclasses implement :meth:`on_forward`.
    """

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        """The forward hook: calls :meth:`on_forward`."""
        return self.on_forward(module, args, output)

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Called after ``module.forward``; a non-None return replaces the output."""
        raise NotImplementedError


def _ours(hook: Any) -> bool:
    return isinstance(hook, (_WeakHook, OwnedHook))


def _drop_hooks(module: nn.Module, which: Callable[[Any], bool]) -> int:
    """Deletes the forward hooks ``which`` selects from a module (torch's three hook dicts)."""
    keys = [key for key, hook in module._forward_hooks.items() if which(hook)]
    for key in keys:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
    return len(keys)


def _dead(hook: Any) -> bool:
    return isinstance(hook, _WeakHook) and (hook.ref is None or hook.ref() is None)


def remove_hooks(root: nn.Module) -> int:
    """Removes every lcr-lightly hook, live or copied, from a module tree.

    Args:
        root: Root of the tree.

    Returns:
        How many hooks were removed.
    """
    return sum(_drop_hooks(module, _ours) for module in root.modules())


def count_hooks(root: nn.Module) -> int:
    """Counts the lcr-lightly hooks in a module tree (live or copied).

    Args:
        root: Root of the tree.

    Returns:
        The number of hooks.
    """
    return sum(_ours(h) for m in root.modules() for h in m._forward_hooks.values())


_Self = TypeVar("_Self", bound="LayerHook")


class LayerHook:
    """Base class: a removable forward hook on one module, owned by this object.

    Subclasses implement :meth:`on_forward`. The hook is registered on construction,
    removed by :meth:`release` (or on leaving a ``with`` block), and re-registered on
    the copied module when this object is deep-copied or unpickled.

    Args:
        module: The module to hook.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handle: Optional[RemovableHandle] = None
        self.attach()

    def on_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Called after ``module.forward``; a non-None return replaces the output."""
        raise NotImplementedError

    def attach(self) -> None:
        """Registers the hook if it is not registered (purging dead copies first)."""
        if self._handle is None:
            _drop_hooks(self.module, _dead)
            self._handle = self.module.register_forward_hook(_WeakHook(self))

    def release(self) -> None:
        """Removes the hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        """Whether the hook is registered."""
        return self._handle is not None

    def __enter__(self: _Self) -> _Self:
        self.attach()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _transient_state(self) -> dict:
        """State reset on copy/pickle (recorded tensors, handles)."""
        return {"_handle": None}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(self._transient_state())
        return state

    def __setstate__(self, state: dict) -> None:
        was_attached = state.pop("_was_attached", True)
        self.__dict__.update(state)
        if was_attached:
            self.attach()

    def __deepcopy__(self: _Self, memo: dict) -> _Self:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = copy.deepcopy(self.__getstate__(), memo)
        state["_was_attached"] = self.attached
        new.__setstate__(state)
        return new
