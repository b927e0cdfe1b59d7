"""The shared pre-processing against PaddleDetection's own TestReader operators, on real image files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_runtime.errors import ConfigError, DataError
from edge_runtime.modelspec import InputSpec
from edge_runtime.preprocess import as_bgr, ppdet_test_transforms, preprocess


def _images(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (123, 197, 3), dtype=np.uint8)
    grad = np.dstack(np.meshgrid(np.linspace(0, 255, 640), np.linspace(0, 255, 480))[::-1] + [np.full((480, 640), 90.0)])
    small = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    paths = []
    for name, img in (("noise.png", noise), ("grad.jpg", grad.astype(np.uint8)), ("small.bmp", small)):
        path = tmp_path / name
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def _ppdet_reader(spec: InputSpec):
    from detect.heavy import paddle_stack

    paddle_stack()
    from ppdet.data.transform import operators

    ops = []
    for item in ppdet_test_transforms(spec):
        (name, kwargs), = item.items()
        ops.append(getattr(operators, name)(**kwargs))
    return ops


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(size=(96, 128)),  # the export default: linear, scale 1/255, no mean/std
        InputSpec(size=(64, 64), interp="cubic"),  # PP-YOLOE's own TestReader uses interp 2 (cv2 cubic)
        InputSpec(size=(80, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ],
)
def test_matches_ppdet_test_reader(tmp_path, spec):
    ops = _ppdet_reader(spec)
    for path in _images(tmp_path):
        sample = {"im_file": str(path)}
        for op in ops:
            sample = op(sample)
        image, scale_factor = preprocess(cv2.imread(str(path)), spec)
        assert image.shape == (1, 3, spec.height, spec.width) and image.dtype == np.float32
        assert scale_factor.shape == (1, 2) and scale_factor.dtype == np.float32
        diff = float(np.max(np.abs(image[0] - sample["image"])))
        assert diff == 0.0, path.name  # bit for bit: same cv2 calls, same float32/float64 arithmetic
        np.testing.assert_allclose(scale_factor[0], sample["scale_factor"], rtol=1e-7)


def test_known_values_colour_order_and_scale_factor():
    bgr = np.zeros((30, 40, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in BGR
    image, sf = preprocess(bgr, InputSpec(size=(15, 80)))
    np.testing.assert_allclose(image[0, :, 0, 0], [1.0, 0.0, 0.0], atol=1e-6)  # RGB planes
    np.testing.assert_allclose(sf, [[0.5, 2.0]])
    bgr_out, _ = preprocess(bgr, InputSpec(size=(15, 80), color="BGR", scale=1.0, mean=(10, 0, 0), std=(2, 1, 1)))
    np.testing.assert_allclose(bgr_out[0, :, 3, 3], [-5.0, 0.0, 255.0])


def test_grey_and_bgra_inputs_are_converted_and_bad_inputs_refused():
    grey = np.full((8, 8), 51, np.uint8)
    np.testing.assert_allclose(preprocess(grey, InputSpec(size=(8, 8)))[0], 0.2, atol=1e-6)
    assert as_bgr(np.zeros((4, 4, 4), np.uint8)).shape == (4, 4, 3)
    with pytest.raises(DataError, match=r"expected 8-bit pixels \(uint8\), got float32"):
        preprocess(np.zeros((4, 4, 3), np.float32), InputSpec(size=(8, 8)))
    with pytest.raises(DataError, match=r"expected an H x W x 3 BGR image, got shape \(4, 4, 2\)"):
        preprocess(np.zeros((4, 4, 2), np.uint8), InputSpec(size=(8, 8)))
    with pytest.raises(DataError, match="expected a numpy image"):
        preprocess(None, InputSpec(size=(8, 8)))


def test_ppdet_transforms_refuse_specs_without_equivalent():
    with pytest.raises(ConfigError, match="Decode always yields RGB"):
        ppdet_test_transforms(InputSpec(size=(8, 8), color="BGR"))
    with pytest.raises(ConfigError, match=r"input scale 0.5 has no ppdet NormalizeImage equivalent"):
        ppdet_test_transforms(InputSpec(size=(8, 8), scale=0.5))
    assert ppdet_test_transforms(InputSpec(size=(8, 16), scale=1.0))[2]["NormalizeImage"]["is_scale"] is False
