"""Prints the README table of tested backbones and SSL methods with what LCR hooks.

Every row is produced by the resolver itself: the backbones and method modules of
``tests/clients.py`` (checked by ``tests/test_clients.py``) are wrapped with
``with_common_rationale(model)`` (no ``layer=``/``pool=``), and the layer the head
trains on, its map in the dry forward and the pools replaced at inference are read off
the wrapped model. Methods whose online encoder is decided at the first training step
(DINO: both encoders require gradient when wrapped) take one step first, after
``on_train_start`` as Lightning would.

Run it from the repository root as a module (it imports the ``tests`` package)::

    python -m benchmarks.resolved_layers
"""

from __future__ import annotations

import torch

from lcr_lightly import release, with_common_rationale
from lcr_lightly.layers import find_feature_path
from tests.clients import BACKBONES, CLIENTS, SimSiamClient, features_dim


def _shape(shape: tuple) -> str:
    return "×".join(str(s) for s in shape[1:])


def main() -> None:
    """Prints the markdown rows."""
    print("| backbone / method | layer (map at the dry forward) | pool replaced at inference |")
    print("|---|---|---|")
    for name, spec in BACKBONES.items():
        torch.manual_seed(0)
        backbone = spec.build()
        path = find_feature_path(backbone)
        model = with_common_rationale(SimSiamClient(backbone, features_dim(backbone, spec.size)))
        lcr = model.common_rationale
        pools = ", ".join(f"`{p}`" for p in lcr.pool_names) or "none (tokens pooled functionally)"
        print(f"| {name} | `{lcr.layer_name}` ({_shape(path.map_shape)}) | {pools} |")
        release(model)
    for name, client in CLIENTS.items():
        torch.manual_seed(0)
        model = with_common_rationale(client.build())
        lcr = model.common_rationale
        note = ""
        if not lcr.online_decided:
            model.on_train_start()
            model.training_step(client.batch(), 0)
            note = " (decided at the first step)"
        pools = ", ".join(f"`{p}`" for p in lcr.pool_names) or "none (tokens pooled functionally)"
        print(f"| {name} | `{lcr.layer_name}`{note} | {pools} |")
        release(model)


if __name__ == "__main__":
    main()
