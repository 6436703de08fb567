"""docs/results/performance.png: grouped bars of one :class:`BenchResult`, drawn with matplotlib.

matplotlib is an optional extra (``pip install 'holepunch_mig[plot]'``): it is imported
only when a chart is drawn, so measuring, the table and the page work without it.  The
data a chart shows (:class:`BarPanel`) is taken from the result first and drawn second,
so a chart can be redrawn from figures that are not a whole result.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from holepunch_mig.bench.libvirt_cells import ROWS as LIBVIRT_ROWS
from holepunch_mig.bench.libvirt_cells import cell_from
from holepunch_mig.bench.model import BenchResult
from holepunch_mig.bench.report import measured_cell

__all__ = [
    "Bar",
    "BarPanel",
    "draw",
    "libvirt_panel",
    "qemu_panel",
    "render_png",
    "throughput_panel",
]

#: (median, min, max) of one bar; the whisker spans min..max
Bar = tuple[float, float, float]


@dataclass(frozen=True)
class BarPanel:
    """One bar chart: ``values[group][series]`` is a bar or None (not measured)."""

    title: str
    ylabel: str
    xlabel: str
    groups: list[str]
    series: list[str]
    values: list[list[Bar | None]]


def throughput_panel(res: BenchResult) -> BarPanel:
    """MB/s of every row at every RTT (median, min-max whiskers)."""
    keys: list[tuple[str, str]] = []
    for r in res.rows:
        if (r.number, r.key) not in keys:
            keys.append((r.number, r.key))
    values: list[list[Bar | None]] = []
    for rtt in res.rtts:
        group: list[Bar | None] = []
        for _, key in keys:
            c = measured_cell(res, key, rtt)
            group.append((c.median["mbps"], c.mbps_min, c.mbps_max) if c else None)
        values.append(group)
    where = "lab, two namespaces" if res.where == "lab" else "loopback"
    return BarPanel(
        title=f"Throughput per round-trip time ({where})",
        ylabel="MB/s (10^6 bytes per second), higher is better",
        xlabel="round-trip time",
        groups=[f"{rtt} ms" for rtt in res.rtts],
        series=[f"{n} {k}" for n, k in keys],
        values=values,
    )


def qemu_panel(res: BenchResult) -> BarPanel | None:
    """Wall seconds of the QEMU migrations, direct vs migrate-proxy, per RTT and multifd;
    None when the run had no QEMU cells."""
    if not res.qemu:
        return None
    qs: list[dict[str, Any]] = [q if isinstance(q, dict) else asdict(q) for q in res.qemu]
    groups = sorted({(q["rtt_ms"], q["multifd"]) for q in qs})
    values: list[list[Bar | None]] = []
    for rtt, mf in groups:
        row: list[Bar | None] = []
        for case in ("direct", "proxy"):
            q = next(
                (x for x in qs if (x["rtt_ms"], x["multifd"], x["case"]) == (rtt, mf, case)),
                None,
            )
            row.append((q["median_wall"], min(q["walls"]), max(q["walls"])) if q else None)
        values.append(row)
    mem = qs[0]["mem_mib"]
    return BarPanel(
        title=f"QEMU migration, {mem} MiB guest",
        ylabel="wall seconds, lower is better",
        xlabel="round-trip time, multifd channels",
        groups=[f"{rtt} ms, " + (f"multifd {mf}" if mf else "no multifd") for rtt, mf in groups],
        series=["1 QEMU tcp, no crypto", "5 via migrate-proxy"],
        values=values,
    )


def libvirt_panel(res: BenchResult) -> BarPanel | None:
    """Wall seconds of the libvirt migrations per row, per parallel group; None when the
    run had no libvirt rows."""
    if not res.libvirt:
        return None
    cells = [cell_from(c) for c in res.libvirt]
    groups = sorted({c.parallel for c in cells})
    series = [r for r in LIBVIRT_ROWS if any(c.row == r for c in cells)]
    values: list[list[Bar | None]] = []
    for par in groups:
        row: list[Bar | None] = []
        for name in series:
            c = next((x for x in cells if (x.parallel, x.row) == (par, name)), None)
            row.append((c.median_wall, min(c.walls), max(c.walls)) if c and c.walls else None)
        values.append(row)
    return BarPanel(
        title=f"libvirt migration, {cells[0].mem_mib} MiB guest",
        ylabel="wall seconds, lower is better",
        xlabel="parallel (multifd) connections",
        groups=[f"parallel {p}" if p else "one stream" for p in groups],
        series=[f"libvirt {r}" if r != "holepunch_mig" else r for r in series],
        values=values,
    )


def draw(panels: Sequence[BarPanel]) -> bytes:
    """The PNG of ``panels`` side by side.  Raises ModuleNotFoundError without matplotlib."""
    from matplotlib.figure import Figure

    widths = [max(5, len(p.groups) * len(p.series)) for p in panels]
    fig = Figure(figsize=(3.0 + 0.5 * sum(widths), 5.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(panels), width_ratios=widths, squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        n = max(1, len(panel.series))
        width = 0.8 / n
        for s, name in enumerate(panel.series):
            xs, medians, lows, highs = [], [], [], []
            for g, group in enumerate(panel.values):
                bar = group[s]
                if bar is None:
                    continue
                xs.append(g - 0.4 + width * (s + 0.5))
                medians.append(bar[0])
                lows.append(bar[0] - bar[1])
                highs.append(bar[2] - bar[0])
            ax.bar(
                xs, medians, width * 0.92, yerr=[lows, highs], capsize=2, label=name, color=f"C{s}"
            )
        for g, group in enumerate(panel.values):
            if all(bar is None for bar in group):
                ax.annotate("not measured", (g, 0), ha="center", va="bottom", color="grey")
        ax.set_xticks(range(len(panel.groups)), panel.groups)
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize="small", title="median, whiskers min-max", title_fontsize="small")
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def render_png(res: BenchResult) -> bytes:
    """Throughput bars per RTT and, when the run had them, the QEMU and the libvirt
    migrations' wall times."""
    extra = [p for p in (qemu_panel(res), libvirt_panel(res)) if p is not None]
    return draw([throughput_panel(res), *extra])
