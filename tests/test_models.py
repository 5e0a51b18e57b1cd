"""Every registered model: builds, trains a step, matches the reference parameter counts and, where
torchvision has the same architecture, gives torchvision's outputs after importing its weights."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import cnnkit
from cnnkit.hub import TIMM_TAGS
from cnnkit.models.efficientnet import compound_scaling

# REFERENCE.md, 1000 classes, with top (trainable parameters where Keras and torchvision differ).
REFERENCE_PARAMS = {
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "mobilenet_v1": 4_231_976,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
}
REFERENCE_AUX_PARAMS = {
    ("googlenet", False): 6_624_904,
    ("googlenet", True): 13_004_888,
    ("inception_v3", False): 23_834_568,
    ("inception_v3", True): 27_161_264,
}
TORCHVISION_TWINS = [
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    "googlenet",
    "inception_v3",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    *(f"efficientnet_b{i}" for i in range(8)),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    size = 96 if name == "inception_v3" else 64
    return torch.randn(batch, 3, size, size)


NOT_CLASSIFIERS = {"localizer", "landmarker", "tinyconvnet", "yolo"}  # task models, tested with their task
CLASSIFIERS = [n for n in cnnkit.list_models() if not n.startswith("unet") and n not in NOT_CLASSIFIERS]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_classifier_trains_a_step(name: str) -> None:
    model = cnnkit.create_model(name, num_classes=7)
    x = small_input(name)
    out, aux = model.forward_with_aux(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    sum((o.square().mean() for o in [out, *aux]), torch.zeros(())).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The shared backbone surface.
    feats = model.forward_features(x)
    assert model.forward_head(feats).shape == (2, 7)
    stages = model.forward_stages(x)
    assert [t.shape[1] for t in stages] == [f.channels for f in model.feature_info]
    for t, info in zip(stages, model.feature_info):
        expected = -(-x.shape[-1] // info.stride)
        if name == "inception_v3":  # valid convolutions lose a few pixels at each stage
            assert expected // 2 <= t.shape[-1] <= expected, info
        else:
            assert t.shape[-1] == expected, info


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_equals_reference(name: str) -> None:
    assert n_params(cnnkit.create_model(name)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize(("name", "aux"), sorted(REFERENCE_AUX_PARAMS))
def test_parameter_count_with_and_without_aux_heads(name: str, aux: bool) -> None:
    assert n_params(cnnkit.create_model(name, aux_logits=aux)) == REFERENCE_AUX_PARAMS[(name, aux)]


def _torchvision_model(name: str, **kwargs: object) -> nn.Module:
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": True, "init_weights": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    # Non-trivial BatchNorm statistics, so a mis-mapped buffer cannot go unnoticed.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_torchvision_weights_give_torchvision_outputs(name: str, tmp_path: Path) -> None:
    tv = _torchvision_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    aux = {"aux_logits": True} if name in ("googlenet", "inception_v3") else {}
    ours = cnnkit.create_model(name, weights=path, **aux).eval()
    if name != "mobilenet_v1":
        assert n_params(ours) == n_params(tv)
    x = small_input(name)
    with torch.no_grad():
        diff = (tv(x) - ours(x)).abs().max().item()
    assert diff <= 1e-4


def test_googlenet_aux_heads_match_torchvision_in_training(tmp_path: Path) -> None:
    tv = _torchvision_model("googlenet", dropout=0.0, dropout_aux=0.0).train()
    torch.save(tv.state_dict(), tmp_path / "g.pth")
    ours = cnnkit.create_model(
        "googlenet", weights=tmp_path / "g.pth", drop_rate=0.0, aux_drop_rate=0.0
    ).train()
    x = torch.randn(2, 3, 96, 96)
    expected = tv(x)
    logits, aux = ours.forward_with_aux(x)
    assert len(aux) == 2
    torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(aux[0], expected.aux_logits1, atol=1e-4, rtol=0)
    torch.testing.assert_close(aux[1], expected.aux_logits2, atol=1e-4, rtol=0)
    # In eval the side branches are skipped: forward gives the main logits only.
    assert ours.eval()(x).shape == (2, 1000)


def test_transfer_head_with_other_class_count_is_left_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tv = _torchvision_model("resnet18")
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "r.pth")
    with caplog.at_level("INFO"):
        model = cnnkit.create_model("resnet18", num_classes=5, weights=tmp_path / "r.pth")
    assert "freshly initialised" in caplog.text and "head.fc.weight" in caplog.text
    torch.testing.assert_close(model.stem.conv.conv.weight, tv.conv1.weight)
    assert model.head.fc.weight.shape == (5, 512)
    report = cnnkit.load_weights(cnnkit.create_model("resnet18", num_classes=5), tmp_path / "r.pth")
    assert len(report.skipped_head) == 2 and report.mapped and not report.by_position


@pytest.mark.parametrize("name", [n for n in TORCHVISION_TWINS if n != "mobilenet_v1"])
def test_each_family_maps_torchvision_names_explicitly_whatever_the_order(name: str, tmp_path: Path) -> None:
    """The family's key map names every torchvision tensor (no pairing by position), so a file whose
    tensors come in another order (a safetensors file sorts them by name) still loads exactly."""
    tv = _torchvision_model(name)
    items = list(tv.state_dict().items())
    random.Random(0).shuffle(items)
    shuffled = dict(items)
    torch.save(shuffled, tmp_path / "w.pth")
    aux = {"aux_logits": True} if name in ("googlenet", "inception_v3") else {}
    ours = cnnkit.create_model(name, **aux).eval()
    report = cnnkit.load_weights(ours, tmp_path / "w.pth")
    counted = [k for k in ours.state_dict() if not k.endswith("num_batches_tracked")]
    assert report.mapped and not report.by_position and report.loaded == len(counted)
    x = small_input(name)
    with torch.no_grad():
        assert (tv(x) - ours(x)).abs().max().item() <= 1e-4


def test_mismatched_architecture_names_keys_and_shapes(tmp_path: Path) -> None:
    torch.save(_torchvision_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(cnnkit.WeightsError, match="tensors"):
        cnnkit.create_model("resnet50", weights=tmp_path / "r18.pth")
    torch.save(_torchvision_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(cnnkit.WeightsError, match="does not fit"):
        cnnkit.create_model("mobilenet_v2", weights=tmp_path / "r34.pth")


def test_weights_file_that_pickles_code_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module, not a state dict
    with pytest.raises(cnnkit.WeightsError, match="never unpickles"):
        cnnkit.create_model("resnet18", weights=tmp_path / "module.pt")
    with pytest.raises(cnnkit.WeightsError, match="not found"):
        cnnkit.create_model("resnet18", weights=tmp_path / "missing.pth")


def test_save_weights_round_trip_rebuilds_from_metadata(tmp_path: Path) -> None:
    model = cnnkit.create_model("mobilenet_v2", num_classes=3, width=0.5, in_chans=1).eval()
    path = cnnkit.save_weights(model, tmp_path / "m.safetensors", metadata={"class_names": ["a", "b", "c"]})
    again = cnnkit.load_model(path).eval()
    assert again.cnnkit_config == model.cnnkit_config
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    assert cnnkit.weights.read_metadata(path)["class_names"] == ["a", "b", "c"]
    # Transfer: same file, new class count.
    assert cnnkit.create_model(weights=path, num_classes=10).num_classes == 10


def test_pretrained_first_conv_adapts_to_grayscale(tmp_path: Path) -> None:
    tv = _torchvision_model("resnet18")
    torch.save(tv.state_dict(), tmp_path / "r.pth")
    gray = cnnkit.create_model("resnet18", in_chans=1, weights=tmp_path / "r.pth").eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x), tv(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_features_only_returns_each_stage() -> None:
    backbone = cnnkit.create_model("resnet18", features_only=True, out_indices=(1, 2, 3))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1:] for f in feats] == [(128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert [i.stride for i in backbone.feature_info] == [8, 16, 32]
    pooled = cnnkit.create_model("efficientnet_b0", num_classes=0)
    assert pooled(torch.randn(2, 3, 64, 64)).shape == (2, 1280)


def test_reset_classifier_and_aux_heads() -> None:
    model = cnnkit.create_model("googlenet")
    model.reset_classifier(4)
    logits, aux = model.train().forward_with_aux(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4) and [a.shape for a in aux] == [(2, 4), (2, 4)]
    model.reset_classifier(0)
    assert len(model.aux) == 0 and model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


def test_registry_errors() -> None:
    with pytest.raises(cnnkit.CnnkitError, match="did you mean resnet50"):
        cnnkit.create_model("resnet5O")
    with pytest.raises(cnnkit.CnnkitError, match="already registered"):
        cnnkit.registry.register_model("resnet18")(lambda: nn.Identity())
    with pytest.raises(cnnkit.CnnkitError, match="unexpected keyword"):
        cnnkit.create_model("resnet18", widht=2)
    assert cnnkit.list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(8)]


def test_custom_compound_scaling_reports_its_choice() -> None:
    s = compound_scaling(1.0)
    assert (round(s.width, 3), round(s.depth, 3), s.resolution) == (1.1, 1.2, 256)
    assert 1.9 < 1.2 * 1.1**2 * 1.15**2 < 2.0
    model = cnnkit.create_model("efficientnet", phi=1.0, num_classes=3)
    assert model.scaling == s and model.default_imgsz == 256
    b0 = cnnkit.create_model("efficientnet", phi=0.0)
    assert n_params(b0) == REFERENCE_PARAMS["efficientnet_b0"]


def test_foreign_safetensors_are_put_back_in_registration_order(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tv = _torchvision_model("mobilenet_v2")
    save_file(
        {k: v.contiguous() for k, v in tv.state_dict().items()}, tmp_path / "tv.safetensors"
    )  # name-sorted
    ours = cnnkit.create_model("mobilenet_v2", weights=tmp_path / "tv.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() <= 1e-4


def test_classifier_weights_into_a_headless_backbone(tmp_path: Path) -> None:
    clf = cnnkit.create_model("resnet18", num_classes=10, width=0.25)
    path = cnnkit.save_weights(clf, tmp_path / "clf.safetensors")
    backbone = cnnkit.create_model("resnet18", num_classes=0, width=0.25)
    report = cnnkit.load_weights(backbone, path)
    assert sorted(report.unused) == ["head.fc.bias", "head.fc.weight"]
    torch.testing.assert_close(backbone.stem.conv.conv.weight, clf.stem.conv.conv.weight)


@pytest.mark.parametrize(("name", "expected"), [("yolo", 80), ("unet_same", 2), ("tinyconvnet", 4)])
def test_a_builders_own_default_class_count_holds(name: str, expected: int) -> None:
    """``create_model`` passes no class count the caller did not give: the builder's default stands."""
    kwargs = {"backbone_args": {"width": 0.125}} if name == "yolo" else {}
    model = cnnkit.create_model(name, **kwargs)
    assert model.num_classes == expected
    rebuilt = cnnkit.create_model(name, **model.cnnkit_config["args"])  # the recorded config rebuilds it
    assert rebuilt.num_classes == expected


@pytest.mark.parametrize(
    ("timm_name", "name"),
    sorted({(tag.partition(".")[0], model) for tag, model in TIMM_TAGS.items()} | {("resnet50", "resnet50")}),
)
def test_timm_checkpoints_load_and_match(timm_name: str, name: str, tmp_path: Path) -> None:
    """Every timm architecture ``cnnkit.hub`` fetches weights for is the cnnkit model's. Seen: timm's
    mobilenetv3_large_100 failed (its head's first layer is a 1x1 conv, cnnkit's a Linear)
    and, once loaded, differed by 2%: timm trains it with BatchNorm epsilon 1e-5, torchvision with 1e-3.
    The epsilon travels with the saved weights."""
    import timm

    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False).eval()
    with torch.no_grad():  # statistics away from the initial 0/1, so a wrong epsilon would show
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    model = cnnkit.create_model(name, weights=tmp_path / "timm.pth").eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = reference(x)
        assert (model(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
        cnnkit.save_weights(model, tmp_path / "cnnkit.safetensors")
        again = cnnkit.create_model(None, weights=tmp_path / "cnnkit.safetensors").eval()
        assert (again(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


@cnnkit.registry.register_model("user_net_for_tests")
def _user_net(num_classes: int = 10, in_chans: int = 3, width: int = 8) -> nn.Module:
    """A model of the user's own shape (no stages, no head attribute), registered as users do."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )  # fmt: skip


def test_a_registered_model_trains_validates_predicts_exports_and_fine_tunes(
    digits_0_4: Path, digits_5_9: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from cnnkit.export import export

    quick = {"epochs": 1, "imgsz": 32, "workers": 0, "quiet": True, "project": tmp_path}
    first = cnnkit.train(
        "classify", digits_0_4, model="user_net_for_tests", model_args={"width": 12}, **quick
    )
    assert set(cnnkit.val(first.best).metrics) >= {"top1", "val_loss"}
    image = sorted((digits_0_4 / "val").rglob("*.png"))[0]
    (r,) = cnnkit.load(first.best)(image)
    assert r.labels[0] in {"zero", "one", "two", "three", "four"}
    onnx = export(first.best, "onnx", out=tmp_path / "user.onnx")
    assert onnx.max_diff < 1e-4 and cnnkit.load(onnx.path)(image)[0].labels == r.labels
    # transfer: the old classifier (its last Linear) is left out, the base frozen but for the head
    second = cnnkit.train("classify", digits_5_9, pretrained=str(first.best), freeze=True, **quick)
    assert 0 < second.trainable_params < second.frozen_params + second.trainable_params
    assert cnnkit.weights.read_metadata(second.best)["args"]["width"] == 12


def test_any_timm_model_is_a_backbone_for_every_task(tmp_path: Path, digits_0_4: Path) -> None:
    """``timm/NAME`` classifies, feeds a detector's neck, a U-Net's decoder and a localizer's head, and
    loads timm's own weights from a local file (the levels equal the timm model's stages)."""
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    model = cnnkit.create_model("timm/convnext_atto", num_classes=4).eval()
    assert model(x).shape == (1, 4) and [(f.channels, f.stride) for f in model.feature_info] == [
        (40, 4), (80, 8), (160, 16), (320, 32)
    ]  # fmt: skip
    levels = cnnkit.create_model("timm/convnext_atto", features_only=True, out_indices=(1, 2))(x)
    assert [t.shape[1:] for t in levels] == [(80, 8, 8), (160, 4, 4)]
    assert cnnkit.create_model("unet_timm/resnet18", num_classes=3)(x).shape == (1, 3, 64, 64)
    yolo = cnnkit.create_model("yolo", num_classes=3, backbone="timm/mobilenetv3_small_100", strides=(8, 16))
    assert [o.shape[1:3] for o in yolo(x)] == [(8, 8), (4, 4)]
    assert cnnkit.create_model("localizer", num_classes=2, backbone="timm/resnet18")(x).shape == (1, 7)
    with pytest.raises(cnnkit.CnnkitError, match="timm/not_a_model: Unknown model"):
        cnnkit.create_model("timm/not_a_model")

    reference = timm.create_model("convnext_atto").eval()
    torch.save(reference.state_dict(), tmp_path / "convnext_atto.pth")
    loaded = cnnkit.create_model("timm/convnext_atto", weights=tmp_path / "convnext_atto.pth").eval()
    with torch.no_grad():
        expected = reference.stages(reference.stem(x))
        torch.testing.assert_close(loaded.forward_features(x), expected)
    assert loaded.cnnkit_config["args"] == {}  # rebuilt without timm's file once trained weights exist
    result = cnnkit.train(
        "classify", digits_0_4, model="timm/convnext_atto", pretrained=str(tmp_path / "convnext_atto.pth"),
        epochs=1, imgsz=32, workers=0, quiet=True, project=tmp_path,
    )  # fmt: skip
    assert cnnkit.weights.read_metadata(result.best)["model"] == "timm/convnext_atto"
    image = sorted((digits_0_4 / "val").rglob("*.png"))[0]
    assert len(cnnkit.load(result.best)(image)[0].labels) == 1
