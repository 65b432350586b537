"""The lineage graph of a model page, laid out on the server and drawn as inline SVG.

A model's ancestry (the merges and LoRAs its metadata records, resolved to files of the
library where their hashes are known) is a small graph: the model on top, what it was made
from on the rows below, each box a link to that model's page when the library holds it.
Laying it out here keeps the page free of scripts for it and lets a test read the result;
the template only draws the boxes and curves this module places. An ancestor reached twice
(the same base under two merges) is one box with two edges; the graph stops at
``MAX_NODES`` boxes (saying how many were left out), so hostile metadata cannot make the
page unbounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 220, 44, 28, 56, 8
MAX_NODES = 120
NAME_CHARS = 30


@dataclass
class Ancestor:
    """One model in a lineage: ``key`` names it uniquely (a hash, or the library id);
    ``sources`` are what it was made from, each with the relation (``"merge 0.5"``,
    ``"LoRA x0.8"``, ``"base"``) drawn on the edge."""

    key: str
    name: str
    detail: str = ""
    model_id: int | None = None
    sources: list[tuple[Ancestor, str]] = field(default_factory=list)


@dataclass
class Box:
    x: int
    y: int
    name: str
    full_name: str
    detail: str
    model_id: int | None
    is_self: bool


@dataclass
class Edge:
    path: str  # SVG path data, from the model's box down to its source's
    label: str
    label_x: int
    label_y: int


@dataclass
class Drawing:
    width: int
    height: int
    boxes: list[Box]
    edges: list[Edge]
    left_out: int  # ancestors not drawn past MAX_NODES
    box_width: int = BOX_W
    box_height: int = BOX_H


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "\u2026"


def layout(root: Ancestor) -> Drawing:
    """Rows by distance from ``root`` (an ancestor on the first row it is reached by),
    each row centred; edges are curves from bottom to top edges of the boxes."""
    rows: list[list[Ancestor]] = [[root]]
    row_of = {root.key: 0}
    links: list[tuple[Ancestor, Ancestor, str]] = []
    left_out = 0
    level = 0
    while level < len(rows):
        for node in rows[level]:
            for source, relation in node.sources:
                if source.key not in row_of:
                    if len(row_of) >= MAX_NODES:
                        left_out += 1
                        continue
                    row_of[source.key] = level + 1
                    if len(rows) == level + 1:
                        rows.append([])
                    rows[level + 1].append(source)
                links.append((node, source, relation))
        level += 1
    widest = max(len(row) for row in rows)
    width = 2 * MARGIN + widest * BOX_W + (widest - 1) * GAP_X
    height = 2 * MARGIN + len(rows) * BOX_H + (len(rows) - 1) * GAP_Y
    where: dict[str, tuple[int, int]] = {}
    boxes = []
    for r, row in enumerate(rows):
        span = len(row) * BOX_W + (len(row) - 1) * GAP_X
        x0 = (width - span) // 2
        for i, node in enumerate(row):
            x, y = x0 + i * (BOX_W + GAP_X), MARGIN + r * (BOX_H + GAP_Y)
            where[node.key] = (x, y)
            boxes.append(Box(x, y, _short(node.name), node.name, _short(node.detail),
                             node.model_id, node is root))
    edges = []
    for child, source, relation in links:
        if source.key not in where:
            continue
        (cx, cy), (sx, sy) = where[child.key], where[source.key]
        x1, y1, x2, y2 = cx + BOX_W // 2, cy + BOX_H, sx + BOX_W // 2, sy
        bend = (y2 - y1) // 2 if y2 > y1 else GAP_Y  # a source drawn above: loop around
        # the label three quarters of the way down, near its source: the labels of one
        # model's sources stand apart
        edges.append(Edge(f"M{x1},{y1} C{x1},{y1 + bend} {x2},{y2 - bend} {x2},{y2}",
                          relation, (x1 + 3 * x2) // 4, (y1 + 3 * y2) // 4))
    return Drawing(width, height, boxes, edges, left_out)
