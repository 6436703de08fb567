"""A heat-map PNG of the traversal matrix, written with zlib + struct (no matplotlib).

Rows are presets, columns RTTs; a cell's colour goes from red (0 % direct) through amber
to green (100 %), and says what it shows in text ("5/5 0.21S").  A cell that does not
match its expectation gets a thick magenta frame; expected failures that failed as
expected are drawn grey-blue ("EXPECTED FAIL").  Labels use a built-in 5x7 font.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from holepunch_mig.lab.matrix import Matrix

# 5x7 glyphs, one int per row, bit 4 = leftmost pixel.
_FONT: dict[str, tuple[int, ...]] = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "A": (14, 17, 17, 31, 17, 17, 17),
    "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (30, 17, 17, 17, 17, 17, 30),
    "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15),
    "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12),
    "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17),
    "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16),
    "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30),
    "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4),
    "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4),
    "Z": (31, 1, 2, 4, 8, 16, 31),
    "0": (14, 17, 19, 21, 25, 17, 14),
    "1": (4, 12, 4, 4, 4, 4, 14),
    "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14),
    "4": (2, 6, 10, 18, 31, 2, 2),
    "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14),
    "7": (31, 1, 2, 4, 8, 8, 8),
    "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "-": (0, 0, 0, 31, 0, 0, 0),
    ".": (0, 0, 0, 0, 0, 12, 12),
    "/": (1, 1, 2, 4, 8, 16, 16),
    ":": (0, 12, 12, 0, 12, 12, 0),
    "%": (24, 25, 2, 4, 8, 19, 3),
    "?": (14, 17, 1, 2, 4, 0, 4),
    "!": (4, 4, 4, 4, 4, 0, 4),
    ",": (0, 0, 0, 0, 12, 4, 8),
    "(": (2, 4, 8, 8, 8, 4, 2),
    ")": (8, 4, 2, 2, 2, 4, 8),
}

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
MAGENTA: Color = (200, 0, 200)
EXPECTED_FAIL: Color = (150, 170, 200)


class Canvas:
    def __init__(self, width: int, height: int, bg: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(bg) * width) for _ in range(height)]

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        px = bytes(color)
        for yy in range(max(0, y), min(self.height, y + h)):
            x0, x1 = max(0, x), min(self.width, x + w)
            if x1 > x0:
                self.rows[yy][3 * x0 : 3 * x1] = px * (x1 - x0)

    def frame(self, x: int, y: int, w: int, h: int, color: Color, t: int) -> None:
        self.rect(x, y, w, t, color)
        self.rect(x, y + h - t, w, t, color)
        self.rect(x, y, t, h, color)
        self.rect(x + w - t, y, t, h, color)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> None:
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT["?"])
            for row, bits in enumerate(glyph):
                for col in range(5):
                    if bits & (16 >> col):
                        self.rect(x + col * scale, y + row * scale, scale, scale, color)
            x += 6 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\0" + bytes(r) for r in self.rows)

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack("!I", len(data)) + body + struct.pack("!I", zlib.crc32(body))

        ihdr = struct.pack("!IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def text_width(text: str, scale: int = 2) -> int:
    return 6 * scale * len(text)


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


def render(matrix: Matrix) -> bytes:
    presets: list[str] = []
    for c in matrix.cells:
        if c.preset not in presets:
            presets.append(c.preset)
    rtts: Sequence[int] = matrix.rtts
    cell_w, cell_h, pad = 190, 34, 10
    label_w = max(text_width(p) for p in presets) + 2 * pad
    title_h = 40
    title = f"TRAVERSAL MATRIX {matrix.generated}"
    footer = "LABEL: DIRECT RUNS / RUNS, MEDIAN TIME TO LINK"
    width = max(label_w + cell_w * len(rtts) + pad, text_width(title) + 2 * pad, 560)
    height = title_h + 24 + cell_h * len(presets) + 80
    cv = Canvas(width, height)
    cv.text(pad, pad, title, scale=2)
    for j, rtt in enumerate(rtts):
        cv.text(label_w + j * cell_w + 8, title_h, f"RTT {rtt} MS")
    by_key = {(c.preset, c.rtt_ms): c for c in matrix.cells}
    top = title_h + 24
    for i, preset in enumerate(presets):
        y = top + i * cell_h
        cv.text(pad, y + 10, preset)
        for j, rtt in enumerate(rtts):
            x = label_w + j * cell_w
            cell = by_key.get((preset, rtt))
            if cell is None:
                continue
            if cell.expected != "direct" and cell.matches:
                color, label = EXPECTED_FAIL, "EXPECTED FAIL"
            else:
                color = rate_color(cell.success_rate)
                ttl = cell.ttl(0.5)
                label = f"{cell.successes}/{len(cell.runs)}" + (f" {ttl:.2f}S" if ttl else "")
            cv.rect(x + 2, y + 2, cell_w - 4, cell_h - 4, color)
            if not cell.matches:
                cv.frame(x + 2, y + 2, cell_w - 4, cell_h - 4, MAGENTA, 4)
                label += " !"
            cv.text(x + 10, y + 10, label)
    y = top + len(presets) * cell_h + 12
    cv.rect(pad, y, 20, 14, rate_color(1.0))
    cv.text(pad + 26, y, "DIRECT")
    cv.rect(pad + 120, y, 20, 14, rate_color(0.0))
    cv.text(pad + 146, y, "FAILED")
    cv.rect(pad + 240, y, 20, 14, EXPECTED_FAIL)
    cv.text(pad + 266, y, "EXPECTED FAIL")
    cv.frame(pad, y + 22, 20, 14, MAGENTA, 3)
    cv.text(pad + 26, y + 22, "NOT AS EXPECTED (!)")
    cv.text(pad, y + 44, footer)
    return cv.png()
