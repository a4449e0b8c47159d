"""Image transforms: lightly's SSL view transforms and a plain evaluation transform."""

from __future__ import annotations

from typing import Any

from lightly.transforms import BYOLTransform, MoCoV2Transform, SimCLRTransform, SimSiamTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torchvision import transforms as T


def eval_transform(image_size: int = 224, crop: bool = True) -> T.Compose:
    """Resize (to 8/7 of the crop, 256 for 224) + centre crop + tensor + normalise.

    Args:
        image_size: Crop size.
        crop: False keeps the whole image (resized to ``image_size``), so that masks of
            the same size stay aligned (synthetic data).

    Returns:
        The transform.
    """
    normalize = T.Normalize(mean=IMAGENET_NORMALIZE["mean"], std=IMAGENET_NORMALIZE["std"])
    if not crop:
        return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), normalize])
    return T.Compose(
        [
            T.Resize(int(round(image_size * 8 / 7))),
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize,
        ]
    )


def ssl_transform(method: str, image_size: int = 224, **kwargs: Any) -> Any:
    """Lightly's two-view transform of a method, at a given image size.

    Blur is off below 64 px (lightly's CIFAR recipe); other arguments pass through.

    Args:
        method: ``"mocov2"``, ``"byol"``, ``"simsiam"`` or ``"simclr"``.
        image_size: Crop size.
        **kwargs: lightly transform arguments (``min_scale``, ``cj_strength``, ...).

    Returns:
        A callable mapping a PIL image to a list of two tensors.
    """
    if image_size < 64:
        kwargs.setdefault("gaussian_blur", 0.0)
    if method == "byol":
        from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=image_size, **kwargs),
            view_2_transform=BYOLView2Transform(input_size=image_size, **kwargs),
        )
    factories = {"mocov2": MoCoV2Transform, "simsiam": SimSiamTransform, "simclr": SimCLRTransform}
    if method not in factories:
        raise ValueError(f"Unknown method {method!r}; expected one of {('byol', *factories)}.")
    return factories[method](input_size=image_size, **kwargs)
