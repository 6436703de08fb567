"""The traversal matrix as a heat map (``lab matrix --png``), drawn with matplotlib.

Rows are presets, columns RTTs (and loss, when the matrix ran a loss column); a cell's
colour goes from red (0 % direct) through amber to green (100 %), and says what it
shows in text ("5/5 0.21 s").  A cell that does not match its expectation gets a thick
magenta frame and a "!"; expected failures that failed as expected are drawn grey-blue
("expected fail").

matplotlib is an optional extra (``pip install 'holepunch_mig[plot]'``), imported only
to draw.  What the map shows (:func:`heat_cells`) is read from the matrix's JSON form,
so a committed ``--json`` file can be drawn again without running the matrix.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from holepunch_mig.lab.matrix import Matrix

__all__ = ["EXPECTED_FAIL", "MAGENTA", "HeatCell", "heat_cells", "rate_color", "render"]

Color = tuple[int, int, int]
MAGENTA: Color = (200, 0, 200)
EXPECTED_FAIL: Color = (150, 170, 200)


@dataclass(frozen=True)
class HeatCell:
    """One cell of the map: its fill, its text, and whether it met its expectation."""

    color: Color
    label: str
    matches: bool


def rate_color(rate: float) -> Color:
    """Red (0) -> amber (0.5) -> green (1)."""
    rate = min(1.0, max(0.0, rate))
    lo, mid, hi = (215, 48, 39), (250, 200, 60), (40, 160, 70)
    a, b, t = (lo, mid, rate * 2) if rate < 0.5 else (mid, hi, rate * 2 - 1)
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


Column = tuple[int, float]
"""(RTT in ms, loss in percent)"""


def column_label(column: Column) -> str:
    rtt, loss = column
    return f"{rtt} ms" + (f", {loss:g} % loss" if loss else "")


def heat_cells(
    data: dict[str, Any],
) -> tuple[list[str], list[Column], dict[tuple[str, Column], HeatCell]]:
    """(presets in order, columns (RTT, loss), cell by (preset, column)) of a matrix in
    its JSON form (:meth:`Matrix.to_dict`)."""
    presets: list[str] = []
    cells: dict[tuple[str, Column], HeatCell] = {}
    for c in data["cells"]:
        if c["preset"] not in presets:
            presets.append(c["preset"])
        matches = bool(c["matches_expected"])
        if c["expected"] != "direct" and matches:
            color, label = EXPECTED_FAIL, "expected fail"
        else:
            color = rate_color(float(c["success_rate"]))
            ttl = c["median_time_to_link"]
            label = f"{c['successes']}/{c['runs']}" + (f" {ttl:.2f} s" if ttl else "")
        if not matches:
            label += " !"
        column = (int(c["rtt_ms"]), float(c.get("loss_pct", 0.0)))
        cells[(c["preset"], column)] = HeatCell(color, label, matches)
    losses = [float(x) for x in data.get("losses_pct", [0.0])]
    columns = [(int(r), loss) for loss in losses for r in data["rtts_ms"]]
    return presets, columns, cells


def _rgb(color: Color) -> tuple[float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255)


def render_data(data: dict[str, Any]) -> bytes:
    """The heat map PNG of a matrix in its JSON form.  Raises ModuleNotFoundError
    without matplotlib."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    presets, rtts, cells = heat_cells(data)
    fig = Figure(
        figsize=(3.0 + 2.2 * len(rtts), 1.6 + 0.42 * len(presets)), dpi=100, layout="constrained"
    )
    ax = fig.subplots()
    for i, preset in enumerate(presets):
        for j, rtt in enumerate(rtts):
            cell = cells.get((preset, rtt))
            if cell is None:
                continue
            ax.add_patch(
                Rectangle(
                    (j - 0.47, i - 0.45),
                    0.94,
                    0.9,
                    facecolor=_rgb(cell.color),
                    edgecolor=_rgb(MAGENTA) if not cell.matches else "none",
                    linewidth=3 if not cell.matches else 0,
                )
            )
            ax.text(j, i, cell.label, ha="center", va="center", fontsize=9)
    ax.set_xlim(-0.5, len(rtts) - 0.5)
    ax.set_ylim(len(presets) - 0.5, -0.5)
    ax.set_xticks(range(len(rtts)), [column_label(c) for c in rtts])
    ax.set_yticks(range(len(presets)), presets)
    ax.set_xlabel("round-trip time between the hosts (and inbound loss on both)")
    ax.set_ylabel("lab preset (left-right)")
    ax.set_title(f"Traversal matrix {data['generated']}: direct runs / runs, median time to link")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    scale = LinearSegmentedColormap.from_list(
        "direct", [_rgb(rate_color(x)) for x in (0.0, 0.5, 1.0)]
    )
    bar = fig.colorbar(_scalar_mappable(scale), ax=ax, fraction=0.04, pad=0.02, format="{x:.0%}")
    bar.set_label("runs with a direct link")
    fig.legend(
        handles=[
            Patch(facecolor=_rgb(EXPECTED_FAIL), label="expected fail (symmetric NAT, fast)"),
            Patch(
                facecolor="white", edgecolor=_rgb(MAGENTA), linewidth=3, label="not as expected (!)"
            ),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize="small",
        frameon=False,
    )
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _scalar_mappable(cmap: Any) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)


def render(matrix: Matrix) -> bytes:
    """The heat map PNG of a matrix just run."""
    return render_data(matrix.to_dict())
