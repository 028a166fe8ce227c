import numpy as np
import pytest
import torch
from skimage import data as skdata

from ptame.data import preprocess
from ptame.models import (
    BUILTIN_MODELS,
    load_auxiliary,
    load_backbone,
    load_ordered_state_dict,
)
from ptame.testing import TinyCNN
from PIL import Image


def classify(backbone, array: np.ndarray) -> int:
    x, _ = preprocess(Image.fromarray(array), backbone.preprocessing)
    with torch.inference_mode():
        return int(backbone(x[None]).argmax(1))


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_weights_classify_real_photos(name: str) -> None:
    backbone = load_backbone(f"builtin:{name}")
    assert backbone.num_classes == 1000
    assert classify(backbone, skdata.chelsea()) == 285  # Egyptian cat
    assert classify(backbone, skdata.coffee()) == 967  # espresso
    assert "cat" in backbone.class_names[285].lower()


def test_builtin_auxiliary_pyramid_declares_itself() -> None:
    aux = load_auxiliary("builtin:efficientnet_lite0")
    assert aux.channels == [24, 40, 112, 320] and aux.reductions == [4, 8, 16, 32]
    feats = aux(torch.rand(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 56, 56), (40, 28, 28), (112, 14, 14), (320, 7, 7)]
    assert load_auxiliary("builtin:efficientnet_lite0", stages=[2, 4]).channels == [40, 320]


def test_torchvision_auxiliary_taps_its_stages() -> None:
    aux = load_auxiliary("torchvision:resnet18", pretrained=False)
    assert aux.channels == [64, 128, 256, 512] and aux.reductions == [4, 8, 16, 32]


def test_mismatched_weights_are_refused() -> None:
    model = TinyCNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(iter(state))
    state[first] = torch.zeros(5, 3, 3, 3)
    with pytest.raises(ValueError, match=r"tensor #0 .* shape \(5, 3, 3, 3\).*refusing"):
        load_ordered_state_dict(model, state)
    state.popitem()
    with pytest.raises(ValueError, match="tensors"):
        load_ordered_state_dict(model, state)


def test_torchscript_and_python_uris(tmp_path) -> None:
    model = TinyCNN().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(model).save(str(path))
    scripted = load_backbone(f"torchscript:{path}")
    direct = load_backbone("python:ptame.testing:TinyCNN")
    x = torch.rand(2, 3, 64, 64)
    assert scripted.num_classes == 4 and direct.num_classes == 4
    assert scripted(x).shape == (2, 4)


@pytest.mark.parametrize(
    ("uri", "error", "match"),
    [
        ("resnet50", ValueError, "no scheme"),
        ("magic:resnet50", ValueError, "unknown model scheme"),
        ("builtin:efficientnet_lite9", ValueError, "unknown builtin"),
        ("timm:not_a_model_name", ValueError, "unknown timm model"),
        ("torchvision:not_a_model", ValueError, "unknown torchvision model"),
        ("torchscript:/nonexistent/model.pt", FileNotFoundError, "not found"),
        ("python:ptame.nonexistent:f", ValueError, "cannot import"),
        ("python:ptame.testing:nothing_here", ValueError, "no attribute"),
        ("python:ptame.testing", ValueError, "python:<module>:<callable>"),
        ("python:ptame.testing:COLOURS", TypeError, "nn.Module"),
    ],
)
def test_bad_model_uris_name_the_problem(uri: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_backbone(uri, pretrained=False)


def test_auxiliary_needs_a_pyramid_model() -> None:
    with pytest.raises(ValueError, match="feature pyramids"):
        load_auxiliary("python:ptame.testing:tiny_cnn")


def test_class_names_of_your_own_classifier_travel_with_the_saved_explainer(tmp_path) -> None:
    from conftest import AUXILIARY, TINY_BACKBONE, TINY_PREP

    from ptame.explainer import Explainer
    from ptame.classes import read_class_names

    listing = tmp_path / "classes.txt"
    listing.write_text("red square\ngreen square\n blue square \nnothing\n\n")
    names = read_class_names(listing)
    assert names == ["red square", "green square", "blue square", "nothing"] == read_class_names(list(names))
    assert read_class_names(None) is None
    listing.write_text("red\n\ngreen\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_class_names(listing)
    with pytest.raises(FileNotFoundError, match="class names file"):
        read_class_names(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="3 class names given for a classifier with 4 outputs"):
        Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP, class_names=names[:3])

    saved = Explainer.from_uris(TINY_BACKBONE, AUXILIARY, preprocessing=TINY_PREP, class_names=names).save(tmp_path / "m")
    loaded = Explainer.load(saved)
    assert loaded.class_names == names  # what bulk rows, HTTP answers and overlays say
    image = torch.rand(3, 64, 64)
    picture = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    assert loaded.explain_image(picture, class_="Blue Square").label == "blue square"


def test_offline_pretrained_weights_fail_fast_naming_the_model_and_the_switch(tmp_path, monkeypatch) -> None:
    import urllib.error

    from huggingface_hub import constants

    from ptame import models
    from ptame.models import PretrainedWeightsError

    offline_before = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(models, "_reachable", lambda url, timeout=3.0: False)  # the hub is down: its cache only
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(PretrainedWeightsError, match=r"^timm:resnet18: .*model.pretrained: false in params.yaml"):
        load_backbone("timm:resnet18", pretrained=True)
    assert constants.HF_HUB_OFFLINE == offline_before  # restored

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsError, match=r"^torchvision:resnet18: .*URLError.*model.pretrained: false"):
        load_backbone("torchvision:resnet18", pretrained=True)


def test_random_weights_are_announced_loudly(caplog) -> None:
    from ptame.explainer import Explainer

    with caplog.at_level("WARNING", logger="ptame.models"):
        Explainer.from_uris("torchvision:resnet18", "backbone", pretrained=False)
    assert "torchvision:resnet18 has RANDOM weights" in caplog.text and "model.pretrained: true" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ptame.models"):
        Explainer.from_uris("python:ptame.testing:tiny_cnn", "backbone")
    assert "RANDOM" not in caplog.text
