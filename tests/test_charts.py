"""The sensitivity chart: a valid PNG of the expected size whose data is the table's, and the HTML page."""

from __future__ import annotations

import math
import struct

import pytest
from qcore.charts import figure, heat_map, save_html, save_png
from qcore.recipe import Recipe
from qcore.sensitivity import AutoRecipe, LayerSensitivity

LAYERS = [f"model.layers.{i}.{name}" for i in range(3) for name in ("self_attn.q_proj", "mlp.down_proj")]


@pytest.fixture
def measured() -> LayerSensitivity:
    errors = {layer: {"p4": 10 ** -(2 + i / 3), "p8": 10 ** -(4 + i / 5)} for i, layer in enumerate(LAYERS)}
    nbytes = {layer: {"full": 400, "p4": 100, "p8": 200} for layer in LAYERS}
    return LayerSensitivity(errors, nbytes, {"p4": {}, "p8": {}}, fixed_nbytes=1000)


@pytest.fixture
def chosen() -> AutoRecipe:
    choice = {layer: ("p8" if i % 2 else "p4") for i, layer in enumerate(LAYERS)}
    choice[LAYERS[0]] = None
    return AutoRecipe(Recipe(default=None), choice, 0, 0.0, 0)


def test_heat_map_holds_the_tables_numbers(measured, chosen):
    data = heat_map(measured, chosen)
    assert data.layers == LAYERS and data.presets == ["p4", "p8"]
    for row, layer in zip(data.values, LAYERS, strict=True):
        assert row == [math.log10(measured.errors[layer]["p4"]), math.log10(measured.errors[layer]["p8"])]
    assert data.chosen == [chosen.choice[layer] for layer in LAYERS]


def test_png_is_valid_with_the_expected_size_and_draws_the_data(measured, chosen, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    data = heat_map(measured, chosen)
    path = save_png(data, tmp_path / "chart.png")
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert (width, height) == data.size_pixels
    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_the_chart_draws_the_tables_data_and_outlines_each_choice(measured, chosen):
    pytest.importorskip("matplotlib")
    from matplotlib.patches import Rectangle

    data = heat_map(measured, chosen)
    axes = figure(data).axes[0]
    (image,) = axes.images
    assert image.get_array().tolist() == data.values
    labels = [t.get_text() for t in axes.get_yticklabels()]
    assert labels == [f"{LAYERS[0]} [full precision]", *LAYERS[1:]]  # the one layer the recipe keeps
    assert [t.get_text() for t in axes.get_xticklabels()] == ["p4", "p8"]
    outlined = sorted(
        (round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in axes.patches if isinstance(p, Rectangle)
    )
    expected = sorted((row, data.presets.index(name)) for row, name in enumerate(data.chosen) if name is not None)
    assert outlined == expected


def test_html_page_lists_every_layer_and_marks_the_choice(measured, chosen, tmp_path):
    page = save_html(heat_map(measured, chosen), tmp_path / "chart.html").read_text()
    assert all(layer in page for layer in LAYERS)
    assert page.count("outline:3px") == sum(1 for layer in LAYERS if chosen.choice[layer] is not None)
    assert "full precision" in page


def test_missing_matplotlib_names_the_extra(measured, monkeypatch, tmp_path):
    import builtins

    from qcore.errors import BackendUnavailable

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(BackendUnavailable, match=r"qcore\[plot\]"):
        save_png(heat_map(measured), tmp_path / "chart.png")
