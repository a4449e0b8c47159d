"""Image transforms: lightly's SSL view transforms and a plain evaluation transform."""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

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
            T.Resize(_resize_side(image_size)),  # geometry: eval_geometry
            T.CenterCrop(image_size),
            T.ToTensor(),
            normalize,
        ]
    )


def _resize_side(image_size: int) -> int:
    return int(round(image_size * 8 / 7))


class EvalGeometry(NamedTuple):
    """Where :func:`eval_transform` puts the pixels of one original image.

    Coordinates are continuous, pixel ``i`` covering ``[i, i + 1)``: an original
    position ``u`` lands at ``u * scale - offset`` in the evaluated image.

    Attributes:
        scale_x: Resized width over original width.
        scale_y: Resized height over original height.
        left: Columns cut off on the left by the centre crop.
        top: Rows cut off at the top by the centre crop.
        size: Side of the evaluated (square) image.
    """

    scale_x: float
    scale_y: float
    left: int
    top: int
    size: int

    def point(self, x: float, y: float) -> Tuple[float, float]:
        """Maps a pixel position (index convention: pixel ``(x, y)`` centred at ``x, y``).

        Args:
            x: Column in the original image.
            y: Row in the original image.

        Returns:
            ``(x, y)`` in the evaluated image, same convention; may lie outside
            ``[0, size)`` when the crop cuts the point off.
        """
        return (
            (x + 0.5) * self.scale_x - 0.5 - self.left,
            (y + 0.5) * self.scale_y - 0.5 - self.top,
        )

    def box(self, x: float, y: float, w: float, h: float) -> Tuple[float, float, float, float]:
        """Maps a box ``(x, y, w, h)`` covering ``[x, x + w) x [y, y + h)``.

        Args:
            x: Left edge in the original image.
            y: Top edge.
            w: Width.
            h: Height.

        Returns:
            Edges ``(x0, y0, x1, y1)`` in the evaluated image, clipped to ``[0, size]``.
        """

        def clip(v: float) -> float:
            return min(max(v, 0.0), float(self.size))

        return (
            clip(x * self.scale_x - self.left),
            clip(y * self.scale_y - self.top),
            clip((x + w) * self.scale_x - self.left),
            clip((y + h) * self.scale_y - self.top),
        )


def eval_geometry(width: int, height: int, image_size: int = 224) -> EvalGeometry:
    """The scale and crop offsets of ``eval_transform(image_size)`` for one image size.

    Follows torchvision exactly: ``Resize(s)`` with ``s = round(image_size * 8 / 7)``
    sets the shorter side to ``s`` and the longer to ``int(s * long / short)``
    (truncated); ``CenterCrop`` starts at ``int(round((resized - image_size) / 2))``
    (Python's round, halves to even) on each axis.

    Args:
        width: Original image width in pixels.
        height: Original image height in pixels.
        image_size: Crop size of the transform.

    Returns:
        The geometry; ``EvalGeometry.point`` and ``EvalGeometry.box`` map positions.

    Raises:
        ValueError: If a side is not positive.
    """
    if width <= 0 or height <= 0 or image_size <= 0:
        raise ValueError(f"Sizes must be positive, got {width}x{height} and {image_size}.")
    side = _resize_side(image_size)
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(side * long / short)
    new_w, new_h = (side, new_long) if width <= height else (new_long, side)
    return EvalGeometry(
        scale_x=new_w / width,
        scale_y=new_h / height,
        left=int(round((new_w - image_size) / 2.0)),
        top=int(round((new_h - image_size) / 2.0)),
        size=image_size,
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
