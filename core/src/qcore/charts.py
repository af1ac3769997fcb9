"""Charts of per-layer sensitivity: which layers suffer under which preset, and what the automatic recipe chose.

Used by ``qcore sensitivity --plot FILE.png`` and ``--html FILE.html`` after
:func:`qcore.sensitivity.measure_sensitivity` has measured every layer. The PNG needs matplotlib
(``pip install 'qcore[plot]'``); the HTML page needs nothing and embeds the same data as a table coloured like the
heat map.
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

from qcore.errors import BackendUnavailable

if TYPE_CHECKING:
    from qcore.sensitivity import AutoRecipe, LayerSensitivity

__all__ = ["HeatMap", "heat_map", "figure", "save_png", "save_html"]

#: Inches per layer row and per preset column; the figure grows with the model so labels stay readable.
_ROW_INCHES, _COLUMN_INCHES, _MARGIN_INCHES = 0.28, 1.1, 4.4
DPI = 100


@dataclasses.dataclass(frozen=True)
class HeatMap:
    """The numbers a chart shows: ``log10`` of each layer's error under each preset."""

    layers: list[str]
    presets: list[str]
    #: ``values[i][j]``: log10 of the error of ``layers[i]`` under ``presets[j]``.
    values: list[list[float]]
    #: ``chosen[i]``: the preset the automatic recipe picked for ``layers[i]`` (``None``: full precision), or
    #: ``None`` for the whole list when no recipe was chosen.
    chosen: list[str | None] | None
    #: What the values measure, for the title.
    measure: str = "predicted loss increase"

    @property
    def size_pixels(self) -> tuple[int, int]:
        width = _MARGIN_INCHES + _COLUMN_INCHES * max(len(self.presets), 1)
        height = 1.6 + _ROW_INCHES * max(len(self.layers), 1)
        return round(width * DPI), round(height * DPI)


def heat_map(measured: LayerSensitivity, chosen: AutoRecipe | None = None) -> HeatMap:
    """The heat map's data: layers in model order, presets in the order they were measured."""
    layers = list(measured.errors)
    presets = list(measured.configs)
    values = [[math.log10(max(measured.errors[layer][name], 1e-30)) for name in presets] for layer in layers]
    picks = [chosen.choice.get(layer) for layer in layers] if chosen is not None else None
    measure = {"loss": "predicted loss increase", "relative": "relative output error"}[measured.objective]
    return HeatMap(layers, presets, values, picks, measure)


def figure(data: HeatMap):
    """The matplotlib figure of ``data``: a heat map, each chosen cell outlined, layers kept in full precision
    labelled so in blue."""
    try:
        import matplotlib
    except ImportError:
        raise BackendUnavailable(
            "the sensitivity chart needs matplotlib: pip install 'qcore[plot]' (or use --html, which needs nothing)"
        ) from None
    matplotlib.use("Agg")  # no display: render to a file only
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    width, height = data.size_pixels
    chart = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = chart.subplots()
    image = axes.imshow(data.values, aspect="auto", cmap="magma_r", interpolation="nearest")
    axes.set_xticks(range(len(data.presets)), data.presets, rotation=30, ha="right")
    full = set() if data.chosen is None else {row for row, name in enumerate(data.chosen) if name is None}
    labels = [f"{layer} [full precision]" if row in full else layer for row, layer in enumerate(data.layers)]
    axes.set_yticks(range(len(data.layers)), labels, fontsize=7)
    for row in full:
        axes.get_yticklabels()[row].set_color("tab:blue")
    axes.set_title(f"{data.measure} per layer (log10; darker is worse)")
    chart.colorbar(image, ax=axes, label="log10 error")
    if data.chosen is not None:
        for row, name in enumerate(data.chosen):
            if name is not None:
                column = data.presets.index(name)
                axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, lw=2, ec="tab:cyan"))
    # A fixed canvas (no tight bounding box), so the file is exactly ``data.size_pixels``.
    inches = width / DPI
    chart.subplots_adjust(left=3.2 / inches, right=1 - 0.6 / inches, bottom=1.0 / (height / DPI), top=0.9)
    return chart


def save_png(data: HeatMap, path: str | Path) -> Path:
    """Draw ``data`` (see :func:`figure`) into a PNG file; returns the path."""
    figure(data).savefig(path, format="png", dpi=DPI)
    return Path(path)


def save_html(data: HeatMap, path: str | Path, *, title: str = "qcore sensitivity") -> Path:
    """Write ``data`` as a self-contained HTML page: a table coloured like the heat map, chosen cells outlined."""
    finite = [v for row in data.values for v in row]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = (high - low) or 1.0

    def cell(value: float, chosen: bool) -> str:
        shade = round(255 * (1 - (value - low) / span))  # lighter is a smaller error
        border = "outline:3px solid #17becf;" if chosen else ""
        ink = "#000" if shade > 110 else "#fff"
        return f'<td style="background:rgb(255,{shade},{shade});color:{ink};{border}">{value:.2f}</td>'

    rows = []
    for index, layer in enumerate(data.layers):
        pick = data.chosen[index] if data.chosen is not None else "-"
        cells = "".join(
            cell(value, data.chosen is not None and data.chosen[index] == name)
            for value, name in zip(data.values[index], data.presets, strict=True)
        )
        rows.append(
            f"<tr><th>{html.escape(layer)}</th>{cells}<td>{html.escape(str(pick or 'full precision'))}</td></tr>"
        )
    header = "".join(f"<th>{html.escape(name)}</th>" for name in data.presets)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}th{text-align:left}</style>"
        f"<h1>{html.escape(title)}</h1><p>log10 of each layer's {html.escape(data.measure)}; outlined: the automatic "
        f"recipe's choice.</p><table><tr><th>layer</th>{header}<th>chosen</th></tr>{''.join(rows)}</table>"
    )
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
