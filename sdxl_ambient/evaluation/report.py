"""PNG figures drawn with PIL: generated-vs-training match pairs and similarity histograms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from sdxl_ambient.images import BACKGROUND

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
INK = (0, 0, 0)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def match_pairs(rows: Sequence[tuple[Image.Image, Image.Image, str]], cell: int = 192) -> Image.Image:
    """One row per (generated, nearest training image, label): the two side by side, label below."""
    if not rows:
        raise ValueError("match_pairs needs at least one row")
    label_h = 18
    font = _font(12)
    sheet = Image.new("RGB", (2 * cell + 8, len(rows) * (cell + label_h)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, (generated, match, label) in enumerate(rows):
        y = r * (cell + label_h)
        sheet.paste(generated.convert("RGB").resize((cell, cell)), (0, y))
        sheet.paste(match.convert("RGB").resize((cell, cell)), (cell + 8, y))
        draw.text((2, y + cell + 2), label, fill=INK, font=font)
    return sheet


def histogram(values_by_name: Mapping[str, Sequence[float]], lo: float = 0.0, hi: float = 1.0, bins: int = 40,
              size: tuple[int, int] = (640, 400), xlabel: str = "top-1 cosine similarity to the training set") -> Image.Image:
    """Overlaid step histograms (fraction of each set per bin), one colour per name, with a legend."""
    width, height = size
    left, right, top, bottom = 50, 12, 12, 40
    pw, ph = width - left - right, height - top - bottom
    counts = {}
    for name, values in values_by_name.items():
        c = [0] * bins
        for v in values:
            c[min(bins - 1, max(0, int((float(v) - lo) / (hi - lo) * bins)))] += 1
        counts[name] = [x / max(1, len(values)) for x in c]
    peak = max([max(c) for c in counts.values()] + [1e-9])
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(11)
    draw.rectangle([left, top, left + pw, top + ph], outline=INK)
    for k in range(5):
        x = left + pw * k / 4
        draw.line([x, top + ph, x, top + ph + 4], fill=INK)
        draw.text((x - 10, top + ph + 6), f"{lo + (hi - lo) * k / 4:.2f}", fill=INK, font=font)
    draw.text((left + pw // 2 - 90, height - 16), xlabel, fill=INK, font=font)
    draw.text((4, top), f"{peak:.2f}", fill=INK, font=font)
    for i, (name, c) in enumerate(counts.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = []
        for b, frac in enumerate(c):
            y = top + ph - ph * frac / peak
            points += [(left + pw * b / bins, y), (left + pw * (b + 1) / bins, y)]
        draw.line([(left, top + ph)] + points + [(left + pw, top + ph)], fill=colour, width=2)
        draw.rectangle([left + 8, top + 8 + 16 * i, left + 20, top + 18 + 16 * i], fill=colour)
        draw.text((left + 26, top + 6 + 16 * i), name, fill=INK, font=font)
    return img
