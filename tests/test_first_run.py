"""A new user's first runs: bad data, a missing extra, shipped configs, hints."""

import pytest
from PIL import Image

from lcr_lightly.experiments.cli import main
from tests.test_cli import TINY_FLAGS


def user_error(capsys, argv):
    """Runs the CLI expecting a user error: exit code 2 and one 'error: ...' line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _image_folder(root, classes=3, per_class=4):
    for split in ("train", "test"):
        for c in range(classes):
            for i in range(per_class):
                path = root / split / f"class{c}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), (60 * c, 20 * i, 90)).save(path)
    return root


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named_in_one_line_and_the_rerun_is_not_blocked(tmp_path, capsys, workers):
    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "class1" / "2.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:300])  # a truncated copy
    out = tmp_path / "run"
    argv = ["pretrain", *TINY_FLAGS, "--dataset", "imagefolder", "--data-root", str(root)]
    argv += ["--epochs", "1", "--num-workers", workers, "--out-dir", str(out)]
    err = user_error(capsys, argv)
    assert err.startswith(f"error: unreadable image {bad} ("), err
    assert err.endswith("; replace or remove the file")
    assert not any((out / "checkpoints").glob("*.ckpt"))  # no epoch finished
    bad.write_bytes(good)
    main(argv)  # the same command runs once the file is fixed
    assert (out / "model.pt").exists() and (out / "results.json").exists()
