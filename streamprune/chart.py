"""A bar chart of block scores, as PNG bytes: people would rather look at it than read a table."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

REMOVED, PROTECTED, KEPT = (214, 39, 40), (158, 158, 158), (31, 119, 180)


def block_chart_png(report: dict) -> bytes:
    """One bar per block: removed blocks red, protected ones grey, the rest blue. Perplexity is
    drawn on a log scale (skipping an early block can raise it a thousandfold)."""
    blocks = report["blocks"]
    log = report["criterion"] == "ppl"
    values = [math.log10(max(b["score"], 1e-12)) if log else b["score"] for b in blocks]
    low = math.floor(min(values)) if log else min(0.0, min(values))
    high = max(values) if max(values) > low else low + 1

    left, right, top, bottom = 80, 20, 50, 60
    width, height = max(640, left + right + 22 * len(blocks)), 420
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    plot_w, plot_h = width - left - right, height - top - bottom

    def y_of(value: float) -> float:
        return top + plot_h * (1 - (value - low) / (high - low))

    for k in range(6):  # y axis: ticks and labels in the score's own units
        value = low + (high - low) * k / 5
        y = y_of(value)
        draw.line([(left - 4, y), (width - right, y)], fill=(230, 230, 230))
        label = f"{10**value:.3g}" if log else f"{value:.3g}"
        draw.text((left - 8, y), label, fill="black", font=font, anchor="rm")
    bar = plot_w / len(blocks)
    for i, (block, value) in enumerate(zip(blocks, values)):
        color = REMOVED if block["removed"] else PROTECTED if block["protected"] else KEPT
        x0 = left + i * bar + bar * 0.15
        draw.rectangle([(x0, y_of(value)), (x0 + bar * 0.7, y_of(low))], fill=color)
        if len(blocks) <= 40 or i % 5 == 0:
            draw.text((x0 + bar * 0.35, top + plot_h + 6), str(block["block"]), fill="black", font=font, anchor="mt")
    draw.line([(left, top), (left, top + plot_h), (width - right, top + plot_h)], fill="black")

    scale = " (log scale)" if log else ""
    title = f"{report['model']}: block importance by {report['criterion']}{scale}; lowest removed first"
    draw.text((left, 15), title, fill="black", font=font)
    draw.text((left + plot_w / 2, height - 22), "block", fill="black", font=font, anchor="mm")
    x = width - right - 300
    for color, name in ((REMOVED, "removed"), (PROTECTED, "protected"), (KEPT, "kept")):
        draw.rectangle([(x, 32), (x + 10, 42)], fill=color)
        draw.text((x + 14, 37), name, fill="black", font=font, anchor="lm")
        x += 95
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
