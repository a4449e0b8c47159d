"""Writing a synthetic set to disk in the CUB-200-2011 layout.

The result is read by :class:`~lcr_lightly.data.CUB200` exactly like the real data,
so the CUB loading path, the benchmark scripts and the localisation metrics against
bounding boxes and part keypoints (:class:`~lcr_lightly.data.fgvc.CUBLocalization`,
reported by ``lcr-lightly pretrain/evaluate`` with ``dataset: cub``) run end to end
without the real files. Part ids: 1 = head mark, 2 = wing patch. Object and part masks
are also written (``segmentations/`` and ``part_masks/``, PNG) for reference; the CUB
evaluation does not read them (the real data set has no part masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

from PIL import Image
from tqdm.auto import tqdm

from lcr_lightly.data.synthetic import SyntheticFineGrained

PART_NAMES = ("head mark", "wing patch")


def export_cub_layout(
    splits: Sequence[SyntheticFineGrained],
    root: Union[str, Path],
    progress: bool = True,
) -> Path:
    """Writes synthetic splits as one CUB-200-2011-style folder.

    Args:
        splits: A train split and a test split (``split`` attribute ``"train"`` or
            ``"test"``) of the same classes.
        root: Output folder (created); it becomes the ``CUB_200_2011`` root.
        progress: Show a progress bar.

    Returns:
        The root path.
    """
    root = Path(root)
    classes = splits[0].classes
    for ds in splits:
        if ds.classes != classes:
            raise ValueError("All splits must share the same classes.")
        if ds.split not in ("train", "test"):
            raise ValueError(f"Split {ds.split!r} has no place in the CUB layout (train/test).")
    for sub in ("images", "parts", "segmentations", "part_masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    dirs = [f"{c + 1:03d}.{name.replace('-', '_')}" for c, name in enumerate(classes)]
    images, labels, split_rows, boxes, locs = [], [], [], [], []
    image_id = 0
    total = sum(len(ds) for ds in splits)
    bar = tqdm(total=total, desc="export", disable=not progress, leave=False)
    for ds in splits:
        for i in range(len(ds)):
            s = ds.sample(i)
            image_id += 1
            rel = f"{dirs[s['label']]}/{ds.split}_{i:05d}.png"
            (root / "images" / dirs[s["label"]]).mkdir(exist_ok=True)
            (root / "segmentations" / dirs[s["label"]]).mkdir(exist_ok=True)
            (root / "part_masks" / dirs[s["label"]]).mkdir(exist_ok=True)
            s["image"].save(root / "images" / rel)
            Image.fromarray(s["object_mask"] * 255).save(root / "segmentations" / rel)
            Image.fromarray(s["part_mask"] * 255).save(root / "part_masks" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {s['label'] + 1}")
            split_rows.append(f"{image_id} {1 if ds.split == 'train' else 0}")
            x, y, w, h = s["bbox"]
            boxes.append(f"{image_id} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
            for part_id, (px, py) in enumerate(s["part_centers"], start=1):
                locs.append(f"{image_id} {part_id} {px:.1f} {py:.1f} 1")
            bar.update(1)
    bar.close()
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split_rows) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    (root / "classes.txt").write_text("".join(f"{c + 1} {d}\n" for c, d in enumerate(dirs)))
    (root / "parts" / "parts.txt").write_text(
        "".join(f"{k} {n}\n" for k, n in enumerate(PART_NAMES, start=1))
    )
    (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    return root
