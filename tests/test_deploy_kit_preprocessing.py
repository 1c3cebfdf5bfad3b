"""Preprocessing in ncnn's terms: the mean_vals/norm_vals formula against ncnn's own
``Mat::from_pixels`` + ``substract_mean_normalize``, serialisation and argument errors."""

from __future__ import annotations

import json
import math

import ncnn
import numpy as np
import pytest

from lightning_ncnnqat.preprocessing import Preprocessing, find_preprocessing

CIFAR = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _ncnn_input(p: Preprocessing, img: np.ndarray, pixel_type: str) -> np.ndarray:
    h, w = img.shape[:2]
    mat = ncnn.Mat.from_pixels(np.ascontiguousarray(img), getattr(ncnn.Mat.PixelType, pixel_type), w, h)
    mat.substract_mean_normalize(list(p.mean_vals), list(p.norm_vals))
    return np.array(mat)


@pytest.mark.parametrize(
    ("pre", "pixel_type", "flip"),
    [
        (Preprocessing(*CIFAR), "PIXEL_RGB", False),
        (Preprocessing(*CIFAR, channel_order="BGR"), "PIXEL_BGR", False),
        (Preprocessing(*CIFAR), "PIXEL_BGR2RGB", True),  # OpenCV pixels fed to an RGB model
        (Preprocessing((0.5,), (0.25,), channel_order="GRAY"), "PIXEL_GRAY", False),
        (Preprocessing((123.7, 116.3, 103.5), (58.4, 57.1, 57.4), input_range=255.0), "PIXEL_RGB", False),
    ],
)
def test_ncnn_formula_matches_torchvision_normalize(pre: Preprocessing, pixel_type: str, flip: bool) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 7, pre.channels), dtype=np.uint8)
    got = _ncnn_input(pre, img, pixel_type)
    want = pre.normalize(img[:, :, ::-1] if flip else img)
    assert got.shape == want.shape == (pre.channels, 5, 7)
    assert np.abs(got - want).max() < 2e-5 * max(1.0, np.abs(want).max())
    assert want.std() > 0.5  # a real spread of values, not a constant


def test_ncnn_values_of_the_cifar_normalisation() -> None:
    p = Preprocessing(*CIFAR)
    assert p.mean_vals == pytest.approx([0.4914 * 255, 0.4822 * 255, 0.4465 * 255])
    assert p.norm_vals == pytest.approx([1 / (0.2470 * 255), 1 / (0.2435 * 255), 1 / (0.2616 * 255)])
    assert p.pixel_type == "PIXEL_RGB"
    raw = Preprocessing((123.675,), (58.395,), input_range=255.0, channel_order="GRAY")
    assert raw.mean_vals == pytest.approx([123.675]) and raw.norm_vals == pytest.approx([1 / 58.395])


def test_dict_and_json_round_trip() -> None:
    p = Preprocessing(*CIFAR, input_range=1.0, channel_order="BGR")
    d = json.loads(json.dumps(p.to_dict()))
    assert d["ncnn"]["pixel_type"] == "PIXEL_BGR" and d["ncnn"]["mean_vals"] == pytest.approx(list(p.mean_vals))
    assert Preprocessing.from_dict(d) == p
    assert Preprocessing.from_dict({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}).channel_order == "RGB"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (0.5, 0.5), "std": (0.2, 0.2, 0.2)}, r"`mean` needs 3 value\(s\).*got 2"),
        ({"mean": (0.5,) * 3, "std": (0.2, 0.0, 0.2)}, r"`std\[1\]` must be > 0, got 0\.0"),
        ({"mean": (0.5, math.nan, 0.5), "std": (0.2,) * 3}, r"`mean\[1\]` must be finite, got nan"),
        ({"mean": (0.5,) * 3, "std": (0.2,) * 3, "channel_order": "RGBA"}, r"channel_order.*'RGBA'"),
        ({"mean": (0.5,) * 3, "std": (0.2,) * 3, "input_range": -1}, r"input_range.*-1"),
        ({"mean": "abc", "std": (0.2,) * 3}, r"`mean` must be a sequence of numbers, got 'abc'"),
        ({"mean": (0.5,), "std": (0.2,), "channel_order": "RGB"}, r"`mean` needs 3"),
    ],
)
def test_errors_name_the_field_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Preprocessing(**kwargs)


def test_from_dict_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['scale'\]"):
        Preprocessing.from_dict({"mean": [0.5] * 3, "std": [0.2] * 3, "scale": 1})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['std'\]"):
        Preprocessing.from_dict({"mean": [0.5] * 3})
    with pytest.raises(ValueError, match="expected a dict, got list"):
        Preprocessing.from_dict([0.5, 0.2])


def test_find_preprocessing_takes_the_first_source() -> None:
    class DM:
        preprocessing = Preprocessing(*CIFAR)

    class Model:
        preprocessing = {"mean": [0.5], "std": [0.5], "channel_order": "GRAY"}

    explicit = Preprocessing((0.1,) * 3, (0.3,) * 3)
    assert find_preprocessing(None, DM(), Model()) == DM.preprocessing
    assert find_preprocessing(explicit, DM()) == explicit
    assert find_preprocessing(None, object(), Model()).channel_order == "GRAY"
    assert find_preprocessing(None, object()) is None
