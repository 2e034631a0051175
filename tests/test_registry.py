import warnings

import pytest

from edge_runtime.errors import ConfigError, UnknownNameError
from edge_runtime.registry import Registry


def test_register_get_and_order():
    reg: Registry[int] = Registry("widget")
    reg.register("beta", 2)
    assert reg.decorator("alpha")(1) == 1  # the decorator hands the entry back unchanged
    assert reg.get("alpha") == 1 and reg.get("beta") == 2
    assert reg.names() == ["beta", "alpha"] and reg.items() == [("beta", 2), ("alpha", 1)]
    assert "alpha" in reg and "gamma" not in reg and len(reg) == 2 and list(reg) == ["beta", "alpha"]


def test_unknown_name_is_a_typed_error_with_suggestions():
    reg: Registry[int] = Registry("widget")
    reg.register("efficientnet_b4", 1)
    reg.register("efficientnet_b0", 2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("efficientnet_b44")
    assert str(err.value) == ("unknown widget 'efficientnet_b44'; known: ['efficientnet_b0', 'efficientnet_b4']; "
                              "did you mean ['efficientnet_b4', 'efficientnet_b0']?")
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)
    with pytest.raises(UnknownNameError, match=r"known: \['efficientnet_b0', 'efficientnet_b4'\]$"):
        reg.get("zzz")  # nothing close: no suggestion


def test_replacing_an_entry_warns_and_the_newer_wins():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.register("a", 1)  # the same object again (a module imported twice) is no replacement
    with pytest.warns(UserWarning, match="widget 'a' re-registered"):
        reg.register("a", 2)
    assert reg.get("a") == 2


def test_every_extension_point_uses_the_one_registry():
    import exporters.pipeline  # noqa: F401 - registers the exporters
    from compression.quantize import ONNX_RECIPES, TORCH_RECIPES
    from edge_runtime.backends.base import BACKENDS
    from exporters.base import EXPORTERS
    from training.data.layouts import LAYOUTS
    from training.models._registry import MODELS

    assert all(isinstance(r, Registry) for r in (ONNX_RECIPES, TORCH_RECIPES, BACKENDS, EXPORTERS, LAYOUTS, MODELS))
    assert ONNX_RECIPES.names() == ["ort", "nncf", "nncf_ac"] and TORCH_RECIPES.names() == ["pt2e", "pt2e_qat", "qat"]
    assert sorted(BACKENDS.names()) == ["coreml", "litert", "onnxruntime"]
    assert sorted(EXPORTERS.names()) == ["coreml", "onnx", "tflite"]
    assert LAYOUTS.names() == ["labels_csv", "aptos", "eyepacs", "idrid", "folders"]
    assert "test_dr_tiny" in MODELS
