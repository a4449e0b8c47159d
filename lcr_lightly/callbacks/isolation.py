"""Running a block on a model in the middle of training without changing the training.

The callbacks of :mod:`lcr_lightly.callbacks` compute maps and scores from the model
being trained; :func:`untouched` restores what that computation changes, so a fit with
and without them trains the same weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator

import torch
from pytorch_lightning.utilities.seed import isolate_rng
from torch import Tensor, nn


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``/``log_dict`` while a callback runs a step."""


@contextmanager
def untouched(
    model: nn.Module, tensors: bool = True, silence_logging: bool = True
) -> Iterator[None]:
    """Runs a block on a model in the middle of training and undoes its side effects.

    Restored on exit: the global random generators (python, NumPy, torch and CUDA,
    through Lightning's ``isolate_rng``), each module's train/eval flag, each
    parameter's ``.grad`` (the same object), and with ``tensors`` the values of every
    parameter and buffer (BN running statistics, momentum encoders updated in a
    ``training_step``, non-persistent buffers such as lightly's MoCo queue).
    ``silence_logging`` turns the module's ``log``/``log_dict`` into no-ops inside the
    block, so a training step run for a figure logs nothing.

    Python attributes that the block changes (other than these) are not restored.

    Args:
        model: The model.
        tensors: Snapshot and restore parameter and buffer values (one copy of them).
        silence_logging: Silence ``model.log`` and ``model.log_dict``.

    Yields:
        Nothing.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    # (module, name, tensor): a step may also rebind a buffer (a lazily built queue)
    slots = [
        (module, name, tensor)
        for module in model.modules()
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]
    ]
    values: Dict[int, Tensor] = {}
    if tensors:
        for _, _, tensor in slots:
            if id(tensor) not in values:
                values[id(tensor)] = tensor.detach().clone()
    shadowed = {name: model.__dict__.get(name) for name in ("log", "log_dict")}
    if silence_logging:
        for name in shadowed:
            model.__dict__[name] = _no_log
    try:
        with isolate_rng():
            yield
    finally:
        if silence_logging:
            for name, previous in shadowed.items():
                if previous is None:
                    model.__dict__.pop(name, None)
                else:
                    model.__dict__[name] = previous
        if tensors:
            with torch.no_grad():
                for module, name, tensor in slots:
                    if getattr(module, name) is not tensor:
                        setattr(module, name, tensor)
                for _, _, tensor in slots:
                    value = values[id(tensor)]
                    if tensor.shape != value.shape:  # resized in place
                        tensor.data = value
                    else:
                        tensor.copy_(value)
        for p, g in zip(params, grads):
            p.grad = g
        for module, mode in modes:
            module.training = mode
