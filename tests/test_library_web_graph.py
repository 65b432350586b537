"""The lineage drawing's layout (graph.py): rows by distance, shared ancestors drawn once,
edges between the boxes they join, and a bound on how much a file's metadata can draw."""

from __future__ import annotations

from ckptkit.library.web.graph import BOX_H, BOX_W, MAX_NODES, Ancestor, layout


def _boxes(drawing):
    return {b.full_name: b for b in drawing.boxes}


def test_rows_and_edges():
    base = Ancestor("h-base", "sd15.safetensors", "sd1", model_id=1)
    a = Ancestor("h-a", "a.safetensors", model_id=2, sources=[(base, "base")])
    b = Ancestor("h-b", "b.ckpt", model_id=None, sources=[(base, "base")])
    merged = Ancestor("h-m", "merged.safetensors", model_id=3,
                      sources=[(a, "weighted_sum 0.3"), (b, "weighted_sum 0.7")])
    d = layout(merged)
    boxes = _boxes(d)
    assert len(d.boxes) == 4  # the shared base once
    assert boxes["merged.safetensors"].is_self and not boxes["a.safetensors"].is_self
    assert boxes["merged.safetensors"].y < boxes["a.safetensors"].y == boxes["b.ckpt"].y
    assert boxes["b.ckpt"].y < boxes["sd15.safetensors"].y
    assert boxes["b.ckpt"].model_id is None
    assert sorted(e.label for e in d.edges) == ["base", "base", "weighted_sum 0.3",
                                                "weighted_sum 0.7"]
    for box in d.boxes:  # every box inside the drawing, none overlapping
        assert box.x >= 0 and box.x + BOX_W <= d.width and box.y + BOX_H <= d.height
    row = sorted(b.x for b in d.boxes if b.y == boxes["a.safetensors"].y)
    assert row[1] - row[0] >= BOX_W
    # each edge starts at the bottom middle of its model and ends at the top of its source
    start = f"M{boxes['merged.safetensors'].x + BOX_W // 2},{boxes['merged.safetensors'].y + BOX_H}"
    assert sum(e.path.startswith(start) for e in d.edges) == 2
    ends = {e.path.rsplit(" ", 1)[1] for e in d.edges}
    assert f"{boxes['sd15.safetensors'].x + BOX_W // 2},{boxes['sd15.safetensors'].y}" in ends


def test_alone():
    d = layout(Ancestor("x", "x.safetensors"))
    assert len(d.boxes) == 1 and d.edges == [] and d.left_out == 0


def test_long_names_are_shortened_but_kept_whole_for_the_title():
    name = "a" * 80 + ".safetensors"
    box = layout(Ancestor("x", name)).boxes[0]
    assert len(box.name) == 30 and box.name.endswith("\u2026") and box.full_name == name


def test_cycle_and_bound():
    """Metadata can claim anything: a file that is its own ancestor ends; a thousand
    sources draw MAX_NODES boxes and say how many were left out."""
    a = Ancestor("a", "a")
    b = Ancestor("b", "b", sources=[(a, "")])
    a.sources.append((b, ""))
    assert len(layout(a).boxes) == 2
    wide = Ancestor("w", "w", sources=[(Ancestor(str(i), str(i)), "") for i in range(1000)])
    d = layout(wide)
    assert len(d.boxes) == MAX_NODES and d.left_out == 1000 - (MAX_NODES - 1)
