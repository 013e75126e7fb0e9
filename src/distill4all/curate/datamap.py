"""The data map: one self-contained HTML file (no network at view time) and static PNGs like the
paper's Figures 1–2 (the map coloured by source and by topic)."""

from __future__ import annotations

import html
import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from distill4all import atomic
from distill4all.records import SURROGATE


@dataclass
class MapData:
    xy: NDArray[np.float32]
    prompts: list[str]
    responses: list[str]
    kept: list[bool]
    rules: list[str]  # "" when kept
    categories: dict[str, tuple[list[str], list[int]]]  # colour mode → (names, code per point)


# In a <script> element, "</script" ends it and "<!--" switches the parser into a state where it
# does; escaped as JSON \u escapes, no text can change how the page parses. U+2028/2029 are escaped
# too, for the JavaScript engines that once treated them as line ends in strings.
_SCRIPT_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(payload: object) -> str:
    """JSON safe to place inside a <script> element, whatever its strings hold."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_SCRIPT_ESCAPES)
    # a lone surrogate cannot be written as UTF-8; as a \u escape it is the same JavaScript string
    return SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def categorical(values: Sequence[str], order: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
    """Names (in `order`, else by frequency) and each value's code."""
    counts = Counter(values)
    names = list(order) if order is not None else sorted(counts, key=lambda v: (-counts[v], v))
    index = {n: i for i, n in enumerate(names)}
    return names, [index.get(v, -1) for v in values]


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  html, body {{ margin: 0; height: 100%; font: 13px/1.4 system-ui, sans-serif; color: #222; }}
  #app {{ display: flex; height: 100%; }}
  #side {{ flex: 0 0 290px; padding: 12px; box-sizing: border-box; border-right: 1px solid #ddd;
          overflow-y: auto; background: #fafafa; }}
  #side h1 {{ font-size: 15px; margin: 0 0 8px; }}
  #side label {{ display: block; margin: 6px 0; }}
  #side input[type=search], #side select {{ width: 100%; box-sizing: border-box; padding: 4px; }}
  #map {{ flex: 1 1 auto; min-width: 0; height: 100%; display: block; cursor: crosshair; }}
  #legend .item {{ cursor: pointer; padding: 2px 0; user-select: none; }}
  #legend .item.off {{ opacity: 0.35; text-decoration: line-through; }}
  .swatch {{ display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; }}
  #status {{ margin: 8px 0; color: #555; }}
  #tip {{ position: fixed; display: none; max-width: 460px; background: #fff; border: 1px solid #999;
          border-radius: 4px; padding: 8px; box-shadow: 0 2px 8px rgba(0,0,0,.2); pointer-events: none;
          white-space: pre-wrap; word-break: break-word; font-size: 12px; }}
  #tip .meta {{ color: #555; margin-bottom: 4px; }}
  #tip .p {{ margin-bottom: 4px; }}
</style></head>
<body><div id="app">
<div id="side">
  <h1>{title}</h1>
  <div>{subtitle}</div>
  <label>colour by <select id="colorby"></select></label>
  <label><input type="search" id="search" placeholder="search prompts and answers"></label>
  <label><input type="checkbox" id="show-kept" checked> kept</label>
  <label><input type="checkbox" id="show-dropped" checked> dropped</label>
  <div id="status"></div>
  <div id="legend"></div>
  <p style="color:#777">Hover a point to read the pair; wheel to zoom, drag to pan, double-click to reset;
  click a legend entry to hide it.</p>
</div>
<canvas id="map"></canvas>
</div>
<div id="tip"></div>
<script id="datamap-data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""


def write_html(path: Path, data: MapData, *, title: str, subtitle: str = "", default_color: str = "source") -> None:
    payload = {
        "x": [round(float(v), 3) for v in data.xy[:, 0]],
        "y": [round(float(v), 3) for v in data.xy[:, 1]],
        "kept": [1 if k else 0 for k in data.kept],
        "rule": data.rules,
        "prompt": [_cut(p, 300) for p in data.prompts],
        "response": [_cut(r, 500) for r in data.responses],
        "cats": {k: {"names": names, "codes": codes} for k, (names, codes) in data.categories.items()},
        "default_color": default_color,
    }
    blob = script_json(payload)
    script = resources.files("distill4all.curate").joinpath("datamap.js").read_text(encoding="utf-8")
    atomic.write_text(
        path,
        _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), data=blob, script=script),
    )


def _plain(text: str) -> str:
    """Text matplotlib draws as written: a pair of $ would start its mathtext parser, which raises on
    what is not valid TeX (`$x^$`); a lone surrogate cannot be drawn."""
    return text.replace("$", r"\$").encode("utf-8", "replace").decode("utf-8")


def write_png(path: Path, xy: NDArray[np.float32], names: list[str], codes: list[int], *, title: str) -> None:
    """A static scatter like the paper's figures, one colour per category (the 12 largest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_plain(n) for n in names]
    title = _plain(title)
    codes_arr = np.asarray(codes)
    counts = np.bincount(codes_arr[codes_arr >= 0], minlength=len(names))
    top = [int(c) for c in np.argsort(-counts)[:12] if counts[c] > 0]
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    other = ~np.isin(codes_arr, top)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=3, c="#cccccc", label="other", linewidths=0)
    size = 4 if len(xy) > 5000 else 10
    for k, c in enumerate(top):
        sel = codes_arr == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(k % 20), label=_cut(names[c], 40), linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    with warnings.catch_warnings():  # a name in a script the font lacks is drawn as boxes: fine
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.tight_layout()
        with atomic.output_file(path) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)
