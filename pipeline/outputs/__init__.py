"""Everything a run writes: images with sidecars, index.jsonl, grid.png, run.json."""
