"""Charts of the measured perplexity tables: perplexity against sparsity per method (uniform solid,
OWL dashed, log scale), and OWL's per-layer sparsities, drawn from the `perplexity-*` sections of
RESULTS.md (written by perplexity.py from real runs; nothing here is measured or typed in).

    python benchmarks/plots.py      # writes benchmarks/ppl_vs_sparsity.png and benchmarks/owl_layers.png
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS

HERE = Path(__file__).resolve().parent
COLORS = {"magnitude": (127, 127, 127), "Wanda": (31, 119, 180), "RIA": (44, 160, 44), "SparseGPT": (214, 39, 40)}
ROW = re.compile(r"^\| (?P<label>[^|]+?) \| (?P<ppl>[\d.]+) \|", re.M)
LABEL = re.compile(r"^(?P<method>\S+) (?P<percent>\d+)%(?P<owl> OWL)?$")
OWL_LINE = re.compile(r"^OWL layer sparsities, (?P<label>.+?): (?P<values>[\d. ]+)$", re.M)


def measured() -> tuple[dict, dict]:
    """({(method, owl): {sparsity: ppl}}, {label: [layer sparsities]}) from every perplexity section."""
    text = RESULTS.read_text()
    curves, layers = {}, {}
    for section in re.findall(r"<!-- perplexity-[^:]+:begin -->(.*?)<!-- perplexity-[^:]+:end -->", text, re.S):
        for row in ROW.finditer(section):
            label = LABEL.match(row["label"].strip())
            if label:
                key = (label["method"], bool(label["owl"]))
                curves.setdefault(key, {})[int(label["percent"]) / 100] = float(row["ppl"])
        for line in OWL_LINE.finditer(section):
            layers[line["label"]] = [float(value) for value in line["values"].split()]
    return curves, layers


def ppl_chart(curves: dict, width: int = 720, height: int = 440) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, right, top, bottom = 70, width - 170, 30, height - 50
    xs = sorted({x for points in curves.values() for x in points})
    ys = [math.log10(y) for points in curves.values() for y in points.values()]
    x_low, x_high = min(xs) - 0.05, max(xs) + 0.05
    y_low, y_high = math.floor(min(ys)), math.ceil(max(ys))

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (math.log10(y) - y_low) / (y_high - y_low) * (bottom - top))  # fmt: skip

    draw.rectangle([left, top, right, bottom], outline="black")
    for decade in range(y_low, y_high + 1):
        y = bottom - (decade - y_low) / (y_high - y_low) * (bottom - top)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{10**decade:g}", fill="black", font=font)
    for x in xs:
        draw.text((at(x, 10**y_low)[0] - 10, bottom + 8), f"{x:.0%}", fill="black", font=font)
    draw.text((left, height - 20), "unstructured sparsity (SmolLM2-135M; WikiText-2 ppl, log scale)", fill="black")
    for row, ((method, owl), points) in enumerate(sorted(curves.items())):
        color = COLORS.get(method, (0, 0, 0))
        line = [at(x, y) for x, y in sorted(points.items())]
        for start, end in zip(line, line[1:]):
            if owl:  # dashed
                for step in range(0, 10, 2):
                    a, b = step / 10, (step + 1) / 10
                    draw.line([start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1]),
                               start[0] + b * (end[0] - start[0]), start[1] + b * (end[1] - start[1])],
                              fill=color, width=2)  # fmt: skip
            else:
                draw.line([start, end], fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((right + 12, top + 16 * row), f"{method}{' + OWL' if owl else ''}", fill=color, font=font)
    return image


def owl_chart(layers: dict, width: int = 720) -> Image.Image:
    rows = len(layers)
    height = 40 + 110 * rows
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for row, (label, values) in enumerate(sorted(layers.items())):
        top, bottom, left, right = 30 + 110 * row, 110 * row + 120, 60, width - 20
        low, high = min(values) - 0.02, max(values) + 0.02
        draw.text((left, top - 16), f"OWL layer sparsities: {label} (layer 0 left)", fill="black", font=font)
        draw.text((4, top), f"{high:.2f}", fill="black", font=font)
        draw.text((4, bottom - 10), f"{low:.2f}", fill="black", font=font)
        bar = (right - left) / len(values)
        for index, value in enumerate(values):
            y = bottom - (value - low) / (high - low) * (bottom - top)
            draw.rectangle([left + index * bar + 1, y, left + (index + 1) * bar - 1, bottom], fill=(31, 119, 180))
    return image


def main() -> None:
    curves, layers = measured()
    if curves:
        ppl_chart(curves).save(HERE / "ppl_vs_sparsity.png")
        names = [method + (" + OWL" if owl else "") for method, owl in curves]
        print(f"wrote {HERE / 'ppl_vs_sparsity.png'}: {', '.join(names)}")
    if layers:
        owl_chart(layers).save(HERE / "owl_layers.png")
        print(f"wrote {HERE / 'owl_layers.png'}: {', '.join(layers)}")


if __name__ == "__main__":
    main()
