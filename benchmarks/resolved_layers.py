"""Prints the README table of tested backbones and SSL methods with what LCR hooks.

Every row is produced by the resolver itself: the backbones and method modules of
``tests/clients.py`` (checked by ``tests/test_clients.py``) are wrapped with
``with_common_rationale(model)`` (no ``layer=``/``pool=``), and the layer the head
trains on, its map in the dry forward and the pools replaced at inference are read off
the resolver's public description (``resolve(backbone)``, ``CommonRationale.sites``).
Methods whose online encoder is decided at the first training step
(DINO: both encoders require gradient when wrapped) take one step first, after
``on_train_start`` as Lightning would.

Run it from the repository root as a module (it imports the ``tests`` package)::

    python -m benchmarks.resolved_layers
"""

from __future__ import annotations

from typing import Optional

import torch

from lcr_lightly import CommonRationale, release, resolve, with_common_rationale
from tests.clients import BACKBONES, CLIENTS, SimSiamClient, features_dim


def _shape(shape: tuple) -> str:
    return "×".join(str(s) for s in shape[1:])


def _row(lcr: CommonRationale, shape: Optional[tuple], decided: bool = True) -> str:
    """Layer (map) | pools, from the hooked sites (online encoder first)."""
    online = lcr.sites[0]
    layer = f"`{online.layer_name}`" + (f" ({_shape(shape)})" if shape else "")
    if not decided:
        layer += " (decided at the first step)"
    pools = [f"`{site.pool_name}`" for site in lcr.sites if site.pool_name]
    return f"{layer} | {', '.join(pools) or 'none (tokens pooled functionally)'}"


def main() -> None:
    """Prints the markdown rows."""
    print("| backbone / method | layer (map at the dry forward) | pool replaced at inference |")
    print("|---|---|---|")
    for name, spec in BACKBONES.items():
        torch.manual_seed(0)
        backbone = spec.build()
        shape = resolve(backbone).map_shape
        model = with_common_rationale(SimSiamClient(backbone, features_dim(backbone, spec.size)))
        print(f"| {name} | {_row(CommonRationale.of(model), shape)} |")
        release(model)
    for name, client in CLIENTS.items():
        torch.manual_seed(0)
        model = with_common_rationale(client.build())
        lcr = CommonRationale.of(model)
        decided = lcr.online_decided
        if not decided:
            model.on_train_start()
            model.training_step(client.batch(), 0)
        print(f"| {name} | {_row(lcr, None, decided)} |")
        release(model)


if __name__ == "__main__":
    main()
