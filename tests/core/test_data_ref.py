"""Datasets read in place: validation of image folders and WebDataset shards, the streaming path, presets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from data_ref_helpers import CLASSES, webdataset_shards, write_image_folder  # noqa: E402

from kdiga_core import jobs  # noqa: E402
from kdiga_core.data_ref import validate_reference  # noqa: E402
from kdiga_core.data_stream import eval_transform, open_reference, train_transform  # noqa: E402
from kdiga_core.errors import DataError  # noqa: E402
from kdiga_core.evaluate.points import evaluation_points  # noqa: E402


def _ref(uri: str, kind: str = "image_folder", **kw) -> dict:
    return {"kind": kind, "uri": uri, "storage_options": {}, "max_corrupt_fraction": 0.05,
            "validate_max_images": 1000, **kw}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("ref") / "shapes", corrupt=1)


def test_image_folder_validation_reports_the_layout(folder):
    summary = validate_reference(_ref(folder.as_uri()))
    layout = summary["layout"]
    assert summary["class_names"] == list(CLASSES) and summary["num_classes"] == 3
    assert layout["splits"]["train"] == {"circle": 25, "square": 24, "stripes": 24}  # the bad file is counted
    assert layout["splits"]["test"] == dict.fromkeys(CLASSES, 8)  # val/ is the test split
    assert set(layout["image_sizes"]) == {"40x40", "48x36", "33x50", "64x64"}
    assert layout["corrupt"]["count"] == 1 and layout["corrupt"]["files"] == ["train/circle/bad0.png"]
    assert summary["input_shape"] is None  # mixed sizes: the job's img_size decides


def test_too_many_corrupt_files_make_the_dataset_invalid(tmp_path):
    root = write_image_folder(tmp_path / "bad", per_class=(2, 2), corrupt=3)
    with pytest.raises(DataError, match=r"could not be read, more than the allowed 5\.0%"):
        validate_reference(_ref(root.as_uri()))


def test_missing_split_is_one_sentence(tmp_path):
    (tmp_path / "x" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images under train/"):
        validate_reference(_ref((tmp_path / "x").as_uri()))


def test_streaming_points_are_stratified_and_decoded_lazily(folder):
    info = validate_reference(_ref(folder.as_uri()))
    data = open_reference({**_ref(folder.as_uri()), **info, "name": "shapes"}, img_size=32, preset="imagenet")
    points = evaluation_points(data, 6, seed=0)
    assert points.x.shape == (6, 3, 32, 32) and points.x.dtype == torch.float32
    assert 0.0 <= float(points.x.min()) and float(points.x.max()) <= 1.0
    assert torch.bincount(points.y, minlength=3).tolist() == [2, 2, 2]
    assert data.train_size == 72  # the corrupt file listed by validation is left out


def test_presets_give_img_size_squares_from_any_size():
    image = torch.randint(0, 256, (3, 50, 33), dtype=torch.uint8)
    for preset in ("none", "cifar", "imagenet"):
        assert train_transform(preset, 32)(image).shape == (3, 32, 32)
        assert eval_transform(preset, 32)(image).shape == (3, 32, 32)


TEACHER_SPEC = {"arch": "cnn_tiny", "num_classes": 3, "in_chans": 3, "img_size": 32}


def _distill(tmp_path: Path, dataset: dict, teacher_path: Path) -> dict:
    spec = {"student": {"arch": "cnn_tiny"}, "objective": {"method": "kdiga", "gamma": 1.0,
                                                             "iga_mode": "finite_difference"},
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "device": "cpu", "img_size": 32,
                      "augmentation": "imagenet", "loader_workers": 1},
            "evaluation": {"max_points": 12, "attacks": [{"name": "fgsm", "eps": 0.03}], "alignment": False,
                           "latency": False}}
    return jobs.run_job("distill", spec, tmp_path / "work",
                        jobs.JobInputs(dataset, teacher=jobs.ModelInput(teacher_path, TEACHER_SPEC)))


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from kdiga_core.config import ModelSpec
    from kdiga_core.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="cnn_tiny", num_classes=3, in_chans=3, img_size=32))
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_distill_job_streams_an_image_folder(folder, teacher_path, tmp_path):
    info = validate_reference(_ref(folder.as_uri()))
    result = _distill(tmp_path, {**_ref(folder.as_uri()), **info, "name": "shapes"}, teacher_path)
    assert result["report"]["points"]["per_class"] == {"circle": 4, "square": 4, "stripes": 4}
    assert (result["model_spec"]["in_chans"], result["model_spec"]["img_size"]) == (3, 32)
    # an evaluate job of that student alone takes img_size from its model card, and measures the same points
    card = next(a["path"] for a in result["artifacts"] if a["kind"] == "model_card")
    spec = {"evaluation": {"max_points": 12, "attacks": [], "alignment": False, "latency": False}}
    again = jobs.run_job("evaluate", spec, tmp_path / "eval",
                         jobs.JobInputs({**_ref(folder.as_uri()), **info, "name": "shapes"}, model_dir=card.parent))
    assert again["report"]["points"] == result["report"]["points"]
    assert again["metrics"]["model_clean_accuracy"] == result["metrics"]["student_clean_accuracy"]


def test_distill_job_streams_webdataset_shards(tmp_path, teacher_path):
    root = tmp_path / "wds"
    for rel, data in webdataset_shards().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    info = validate_reference(_ref(root.as_uri(), "webdataset"))
    assert info["class_names"] == list(CLASSES) and info["train_size"] == 72 and info["test_size"] == 24
    assert info["layout"]["shards"] == {"train": 2, "test": 2}
    result = _distill(tmp_path, {**_ref(root.as_uri(), "webdataset"), **info, "name": "wds"}, teacher_path)
    assert result["report"]["points"]["per_class"] == {"circle": 4, "square": 4, "stripes": 4}


def test_teacher_cache_on_a_streamed_folder_only_when_asked(folder, teacher_path, tmp_path, caplog):
    import logging

    from kdiga_core import distributed
    from kdiga_core.batches import StreamingBatches
    from kdiga_core.config import ObjectiveConfig, TrainConfig
    from kdiga_core.models import create_model
    from kdiga_core.objectives import build_objective
    from kdiga_core.train import train

    info = validate_reference(_ref(folder.as_uri()))
    data = open_reference({**_ref(folder.as_uri()), **info, "name": "shapes"}, img_size=32, preset="none")
    teacher = jobs.ModelInput(teacher_path, TEACHER_SPEC).load()
    obj_cfg = ObjectiveConfig(method="kdiga", gamma=1.0, iga_mode="finite_difference")
    with caplog.at_level(logging.INFO, logger="kdiga_core.cache_policy"):
        for asked in (None, True):
            cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", loader_workers=1, cache_teacher=asked)
            train(create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=32), data, obj_cfg, cfg,
                  teacher=teacher)
    assert "teacher cache off on a dataset read in place" in caplog.text
    assert "teacher cache on: " in caplog.text
    # the streamed cache holds what the teacher says of each row, whatever order the loader read them in
    cfg = TrainConfig(batch_size=16, device="cpu", loader_workers=1, cache_teacher=True)
    source = StreamingBatches(data, cfg, torch.device("cpu"), distributed.context())
    objective = build_objective(obj_cfg, create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=32), teacher)
    source.precompute_teacher(objective, batch_size=16)
    x, y, rows = next(b for g in source.epoch(0, torch.Generator()) for b in g)
    with torch.no_grad():
        expected = teacher(x.float() / 255)
    cached, _ = objective.cache.lookup(rows)
    assert torch.allclose(cached, expected, atol=1e-2)


@pytest.mark.parametrize("kind,preset,full_workers,workers", [("image_folder", "imagenet", 0, 2),
                                                               ("webdataset", "cifar", 0, 0)])
def test_streamed_run_stopped_inside_an_epoch_resumes_exactly(folder, tmp_path, kind, preset, full_workers, workers):
    """A streamed run stopped after step 3 and again after step 7 (5 steps an epoch) ends with the
    weights and history of an uninterrupted run: an image folder's sampler skips the batches already
    trained on, shards read them again and drop them, and every image's augmentation is seeded by
    (seed, epoch, row), so an image folder's loader workers (none uninterrupted, two resumed) change nothing."""
    import json

    from kdiga_core.config import ObjectiveConfig, TrainConfig
    from kdiga_core.errors import StoppedError
    from kdiga_core.models import create_model
    from kdiga_core.train import train

    root = folder
    if kind == "webdataset":
        root = tmp_path / "wds"
        for rel, blob in webdataset_shards().items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(blob)
    info = validate_reference(_ref(root.as_uri(), kind))
    data = open_reference({**_ref(root.as_uri(), kind), **info, "name": "ref"}, img_size=32, preset=preset)
    obj = ObjectiveConfig(method="ce")

    def run(loader_workers: int, **kw):
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu", img_size=32, augmentation=preset,
                          loader_workers=loader_workers)
        torch.manual_seed(0)
        return train(create_model("cnn_tiny", num_classes=3, in_chans=3, img_size=32), data, obj, cfg, **kw)

    full = run(full_workers)
    steps: list[dict] = []
    for k in (3, 7):
        with pytest.raises(StoppedError, match=f"training stopped after step {k} of 10"):
            run(workers, checkpoint_dir=tmp_path / "ckpt", resume=True, on_step=steps.append,
                should_stop=lambda k=k: "Spent." if steps[-1]["global_step"] >= k else None)
        assert json.loads((tmp_path / "ckpt" / "last.json").read_text())["partial"]["step"] == k % 5
    resumed = run(workers, checkpoint_dir=tmp_path / "ckpt", resume=True, on_step=steps.append)
    assert [s["global_step"] for s in steps] == list(range(1, 11))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
