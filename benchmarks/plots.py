"""Charts of the measured perplexity tables: perplexity against sparsity per method (uniform solid,
OWL dashed, log scale), and OWL's per-layer sparsities, drawn from the `perplexity-*` sections of
RESULTS.md (written by perplexity.py from real runs; nothing here is measured or typed in).

    python benchmarks/plots.py      # writes benchmarks/ppl_vs_sparsity.png, owl_layers.png, heal.png
                                    # and quality_ppl_vs_sparsity.png

quality_ppl_vs_sparsity.png: the same chart from the methods quality table's rows (128 x 512
calibration tokens), benchmarks/quality-methods.json (written by quality.py --table methods).

heal.png: perplexity before and after each healing, from benchmarks/heal.json (written by heal.py).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))  # the real test models' builders
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


def quality_curves() -> dict:
    """{(method, owl): {sparsity: ppl}} from the rows quality.py --table methods has measured."""
    saved = HERE / "quality-methods.json"
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else {}
    curves = {}
    for name, row in rows.items():
        label = LABEL.match(name)
        if label:
            curves.setdefault((label["method"], bool(label["owl"])), {})[int(label["percent"]) / 100] = row["ppl"]
    return curves


def ppl_chart(curves: dict, caption: str = "32 x 512 calibration tokens", width: int = 720,
              height: int = 440) -> Image.Image:  # fmt: skip
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
    draw.text((left, height - 20), f"unstructured sparsity (SmolLM2-135M, {caption}; WikiText-2 ppl, log scale)",
              fill="black")  # fmt: skip
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


HEAL_BARS = {"none": (127, 127, 127), "reconstruct": (31, 119, 180), "LoRA": (44, 160, 44), "both": (214, 39, 40)}


def heal_chart(cells: dict, width: int = 720, height: int = 400) -> Image.Image:
    """Perplexity of each pruned model before healing and after each healing (log scale), from
    benchmarks/heal.json (written by heal.py from real runs), with the dense model's as a line."""
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, right, top, bottom = 60, width - 120, 30, height - 60
    models = list(dict.fromkeys(key.split(" | ")[0] for key in cells if " | " in key))
    values = [math.log10(cell["ppl"]) for cell in cells.values()]
    low, high = math.floor(min(values)), math.ceil(max(values))

    def y_of(ppl: float) -> float:
        return bottom - (math.log10(ppl) - low) / (high - low) * (bottom - top)

    for decade in range(low, high + 1):
        draw.line([left, y_of(10**decade), right, y_of(10**decade)], fill=(225, 225, 225))
        draw.text((8, y_of(10**decade) - 6), f"{10**decade:g}", fill="black", font=font)
    group = (right - left) / max(1, len(models))
    bar = group / (len(HEAL_BARS) + 1)
    for index, model in enumerate(models):
        x0 = left + index * group + bar / 2
        for offset, (healing, color) in enumerate(HEAL_BARS.items()):
            cell = cells.get(f"{model} | {healing}")
            if cell:
                x = x0 + offset * bar
                draw.rectangle([x, y_of(cell["ppl"]), x + bar - 2, bottom], fill=color)
        draw.text((x0, bottom + 8), model, fill="black", font=font)
    dense = cells["dense"]["ppl"]
    draw.line([left, y_of(dense), right, y_of(dense)], fill="black", width=1)
    draw.text((right + 6, y_of(dense) - 6), f"dense {dense:.1f}", fill="black", font=font)
    for row, (healing, color) in enumerate(HEAL_BARS.items()):
        draw.text((right + 6, top + 16 * row), "pruned" if healing == "none" else healing, fill=color, font=font)
    draw.text((left, height - 24), "SmolLM2-135M: WikiText-2 ppl (log scale) pruned, and healed three ways", fill="black")
    return image


def main() -> None:
    heal = HERE / "heal.json"
    if heal.exists():
        heal_chart(json.loads(heal.read_text())["cells"]).save(HERE / "heal.png")
        print(f"wrote {HERE / 'heal.png'}")
    curves, layers = measured()
    if curves:
        ppl_chart(curves).save(HERE / "ppl_vs_sparsity.png")
        names = [method + (" + OWL" if owl else "") for method, owl in curves]
        print(f"wrote {HERE / 'ppl_vs_sparsity.png'}: {', '.join(names)}")
    if layers:
        owl_chart(layers).save(HERE / "owl_layers.png")
        print(f"wrote {HERE / 'owl_layers.png'}: {', '.join(layers)}")
    quality = quality_curves()
    if quality:
        ppl_chart(quality, "128 x 512 calibration tokens").save(HERE / "quality_ppl_vs_sparsity.png")
        points = sum(len(points) for points in quality.values())
        print(f"wrote {HERE / 'quality_ppl_vs_sparsity.png'}: {points} measured points")


if __name__ == "__main__":
    main()
