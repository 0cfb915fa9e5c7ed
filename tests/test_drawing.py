"""protopool_hf.drawing: the JET colour table and the heat-map overlay."""

import numpy as np
import PIL.Image
import pytest

from protopool_hf.drawing import colormap_lut, heatmap_overlay


NUM_PROTOTYPES = 8


def test_jet_colour_map_and_overlay():
    lut = colormap_lut()
    assert lut.shape == (256, 3)
    assert lut.dtype == np.uint8
    assert tuple(lut[0]) == (0, 0, 128)  # dark blue
    assert tuple(lut[-1]) == (128, 0, 0)  # dark red
    assert lut[128, 1] > 200  # green in the middle
    matplotlib = pytest.importorskip("matplotlib")
    reference = np.rint(matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255)
    # OpenCV's JET (the official code's) puts its knots at multiples of 1/8; matplotlib's a little off them.
    difference = np.abs(lut.astype(int) - reference)
    assert difference.mean() < 8
    assert difference.max() <= 40
    assert colormap_lut("turbo").shape == (256, 3)
    with pytest.raises(ValueError, match="colour map"):
        colormap_lut("no-such-map")
    image = PIL.Image.new("RGB", (6, 4), (200, 100, 50))
    same = heatmap_overlay(image, np.zeros((4, 6)), image_weight=1.0, heat_weight=0.0)
    assert np.array_equal(np.asarray(same), np.asarray(image))
    with pytest.raises(ValueError, match="upsample"):
        heatmap_overlay(image, np.zeros((5, 5)))
