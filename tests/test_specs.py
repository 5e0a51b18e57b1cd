"""The task-spec layer: the registry, flags generated from each task's Options, the typed run record, and
imports that only point down the layers."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from cnnkit.cli import build_parser, main
from cnnkit.engine.config import TrainConfig, config_from_dict
from cnnkit.errors import CnnkitError
from cnnkit.workflows.record import RunRecord
from cnnkit.workflows.run import options_from_record
from cnnkit.workflows.spec import get_task, list_tasks

SRC = Path(__file__).resolve().parents[1] / "src" / "cnnkit"


def test_every_task_has_the_same_verbs_and_flags_from_its_options() -> None:
    assert sorted(list_tasks()) == ["classify", "detect", "landmarks", "localize", "segment"]
    parser = build_parser()
    for task in list_tasks():
        spec = get_task(task)
        args = parser.parse_args(["train", task, "--data", "d"])
        opts = config_from_dict(spec.Options, {})
        # every Options field is a flag whose unset value keeps the dataclass default
        for f in dataclasses.fields(spec.Options):
            assert hasattr(args, f.name), (task, f.name)
            assert getattr(args, f.name) in (None, "d"), (task, f.name)
        assert opts == spec.Options()
        for verb in (["val", task, "--weights", "w"], ["predict", task, "--weights", "w", "x.png"]):
            args = parser.parse_args(verb)
            assert {"weights", "device", "fast", "json"} <= set(vars(args)), verb
        val = parser.parse_args(["val", task, "--weights", "w"])
        assert {"data", "batch", "imgsz", "workers"} <= set(vars(val))
        assert parser.parse_args(["predict", task, "--weights", "w", "x.png"]).out == f"runs/predict/{task}"


def test_generated_flags_parse_types_choices_and_custom_values() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["train", "detect", "--data", "d", "--strides", "8", "16", "--anchors", "10,13 16,30; 30,61 62,45",
         "--neck", "fpn", "--scale", "0.5", "1.5", "--no-strict", "--backbone-args", '{"width": 0.25}']
    )  # fmt: skip
    opts = config_from_dict(get_task("detect").Options, {k: v for k, v in vars(args).items()
                                 if k in {f.name for f in dataclasses.fields(get_task("detect").Options)}
                                 and v is not None})  # fmt: skip
    assert opts.strides == (8, 16) and opts.scale == (0.5, 1.5) and opts.neck == "fpn"
    assert opts.anchors == (((10.0, 13.0), (16.0, 30.0)), ((30.0, 61.0), (62.0, 45.0)))
    assert opts.backbone_args == {"width": 0.25} and opts.strict is False
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "detect", "--neck", "bogus"])
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "classify", "--model-args", "{not json"])
    marks = parser.parse_args(
        ["train", "landmarks", "--flip-pairs", "1,3", "36,45", "--norm-points", "0", "1"]
    )
    assert marks.flip_pairs == [(1, 3), (36, 45)] and marks.norm_points == [0, 1]


def test_user_mistakes_are_one_line_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "segment"]) == 2
    assert "--data is required" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("epochs: 1\nbogus: 3\n")
    assert main(["train", "classify", "--data", "x", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_run_record_round_trips_exactly_and_reads_files_of_the_first_release() -> None:
    record = RunRecord.new(
        "segment",
        {"name": "unet_same", "args": {"num_classes": 3, "base": 8}},
        TrainConfig(epochs=2, imgsz=48),
        class_names=["bg", "a", "b"],
        data="data/scenes",
        options={"loss": "ce", "class_weights": (1.0, 2.0, 3.0)},
        palette=None,
        ignore_index=255,
    )
    assert RunRecord.from_json(record.to_json()) == record
    again = RunRecord.from_metadata(record.to_metadata())
    assert again.to_metadata() == record.to_metadata()
    assert again.extra == {"palette": None, "ignore_index": 255} and again.train_config.imgsz == 48
    legacy = {  # the metadata of a classify run written by cnnkit 0.1.0
        "format": "1", "model": "resnet18", "args": {"num_classes": 5, "width": 0.25}, "task": "classify",
        "class_names": ["four", "one", "three", "two", "zero"], "imgsz": 32, "crop_fraction": 1.0,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "data": "digits", "val": None,
        "val_fraction": 0.2, "augment": {"scale": [0.35, 1.0], "hflip": 0.0}, "label_smoothing": 0.0,
        "transfer": {"freeze": False}, "pretrained": None, "stage": 1, "epoch": 6, "metrics": {"top1": 0.9},
        "model_config": {"name": "resnet18", "args": {"num_classes": 5, "width": 0.25}},
        "train_config": dataclasses.asdict(TrainConfig(imgsz=32)),
    }  # fmt: skip
    old = RunRecord.from_metadata(legacy)
    assert old.task == "classify" and old.model == "resnet18" and old.class_names == legacy["class_names"]
    assert old.extra["crop_fraction"] == 1.0 and "epoch" not in old.extra
    with pytest.raises(CnnkitError, match="no cnnkit run record"):
        RunRecord.from_metadata({"model": "resnet18"})
    # the options it was trained with come back as the spec's Options, first-release names mapped
    opts = options_from_record(get_task("classify"), legacy, "legacy.safetensors")
    assert (opts.data, opts.fliplr, opts.crop_fraction, opts.freeze, opts.model) == (
        "digits",
        0.0,
        1.0,
        False,
        "resnet18",
    )
    detect_legacy = {
        **legacy, "task": "detect", "class_names": ["a"], "data": "boxes", "val": "val.json",
        "model_config": {"name": "yolo", "args": {"num_classes": 1, "backbone": "resnet18",
                         "strides": [8, 16], "anchors": [[[10, 13]], [[30, 61]]], "neck": "fpn"}},
        "options": {"model": "yolo", "backbone": "resnet18", "box_loss": "giou", "anchor_iou": 0.4,
                    "augment": {"scale": [0.5, 1.5], "hflip": 0.0, "mosaic": 0.5}, "strict": True},
    }  # fmt: skip
    det = options_from_record(get_task("detect"), detect_legacy, "legacy.safetensors")
    assert (det.data, det.val, det.box_loss, det.anchor_iou, det.strict) == (
        "boxes",
        "val.json",
        "giou",
        0.4,
        True,
    )
    assert (det.scale, det.fliplr, det.mosaic, det.neck, det.strides) == (
        (0.5, 1.5),
        0.0,
        0.5,
        "fpn",
        (8, 16),
    )
    assert det.anchors == (((10, 13),), ((30, 61),))


def test_a_new_record_stores_exactly_the_specs_options_and_reads_them_back() -> None:
    for task in list_tasks():
        spec = get_task(task)
        opts = spec.Options(data="somewhere")
        meta = {"task": task, "options": dataclasses.asdict(opts)}
        assert options_from_record(spec, meta, "w") == opts
        # an option this release does not know is refused, not dropped
        with pytest.raises(CnnkitError, match="unknown keys"):
            options_from_record(spec, {**meta, "options": {**meta["options"], "bogus": 1}}, "w")


def test_resume_refuses_flags_that_would_change_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "classify", "--resume", "runs/x", "--epochs", "9", "--model", "vgg11"]) == 2
    err = capsys.readouterr().err
    assert "drop --model (" in err and "Traceback" not in err  # --epochs extends a resumed run


# Layers from the bottom up; a module may import its own layer and those below it, never above.
LAYERS = [
    {"errors", "io", "arithmetic"},
    {"ops", "layers"},
    {"models", "registry", "weights", "hub", "keras_import"},
    {"api", "summary", "viz", "cam"},
    {"data"},
    {"tasks"},
    {"engine", "inference"},
    {"workflows", "export", "backends", "benchmark", "sliding"},
    {"demo", "serve"},
    {"cli", "cli_tasks", "cli_arith", "__init__", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_imports_point_down() -> None:
    """``errors/io -> ops/layers -> models + registry -> api -> data -> tasks -> engine -> workflows ->
    cli``: imports at module level and inside functions alike (the zoo's lazy registration excepted)."""
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(rel.parts if rel.name != "__init__" else rel.parts[:-1]) or "__init__"
        here = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnkit."):
                target = node.module.removeprefix("cnnkit.")
            elif isinstance(node, ast.Import):
                target = next(
                    (a.name.removeprefix("cnnkit.") for a in node.names if a.name.startswith("cnnkit.")), ""
                )
            else:
                continue
            if target and _layer(target) > here and (module, target) != ("registry", "models"):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_weights_of_another_task_are_refused_by_val_and_predict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cnnkit

    weights = cnnkit.save_weights(
        cnnkit.create_model("resnet18", num_classes=2, width=0.125),
        tmp_path / "c.safetensors",
        {"task": "classify"},
    )
    for verb in (
        ["val", "segment", "--weights", str(weights)],
        ["predict", "detect", "--weights", str(weights), "x.png"],
    ):
        assert main(verb) == 2
        assert "holds a classify model, not a" in capsys.readouterr().err
