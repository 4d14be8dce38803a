"""Draw benchmark results (the JSON files the benchmarks write) as one horizontal bar chart per file.

    python -m benchmarks.chart .pipefleet/ceiling-results.json [more.json ...] --out benchmarks/figures/ceiling.png

Each row of a results file is ``{label: {"jobs_per_s" or "items_per_s": value, ...}}``; rows whose label starts
with ``in-process`` are drawn in grey as the reference the fleet is compared against.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(path: Path) -> list[tuple[str, float]]:
    """``(label, rate)`` of every row that has a rate."""
    data = json.loads(path.read_text())
    data = data.get("results", data)
    rows = []
    for label, values in data.items():
        rate = values.get("jobs_per_s", values.get("items_per_s")) if isinstance(values, dict) else None
        if rate is not None:
            rows.append((label, float(rate)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--title", action="append", default=[], help="one title per results file")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [rows_of(path) for path in args.results]
    height = sum(len(rows) for rows in panels) * 0.42 + 1.2 * len(panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, height), squeeze=False)
    for index, (axis, rows) in enumerate(zip(axes[:, 0], panels)):
        labels = [label for label, _ in rows][::-1]
        rates = [rate for _, rate in rows][::-1]
        colors = ["#9e9e9e" if label.startswith("in-process") else "#ff7f0e" if label.startswith("naive") else "#1f77b4"
                  for label in labels]
        axis.barh(labels, rates, color=colors)
        for y, rate in enumerate(rates):
            axis.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
        axis.set_xlabel("items or jobs per second (higher is better)")
        title = args.title[index] if index < len(args.title) else args.results[index].name
        axis.set_title(title, fontsize=10)
        axis.set_xlim(0, max(rates) * 1.18)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
