"""Statistics and histograms of the proxy's profile log (seed 004's analysis, for the proxy).

Usage::

    python -m model_proxy.analyze LOGDIR [--out-dir DIR] [--prefix proxy] [--bins 10]

Reads every ``*.jsonl`` in LOGDIR (the lines ``profiling.py`` writes; other lines are
counted and skipped) and writes to ``--out-dir`` (default LOGDIR):

- ``{prefix}_stats.json``: per metric ``{"unit", "n", "mean", "std", "min", "max",
  "p50", "p90", "p95", "p99", "histogram": {"edges": [bins+1], "counts": [bins],
  "percent": [bins]}}`` (std: population; percentiles: linear interpolation, numpy's
  default), plus ``"files"``, ``"skipped_lines"``;
- ``{prefix}_{metric}.png``: one histogram per metric with at least one value, the
  percentage of calls printed on each non-empty bar.

Metrics: from ``llm_call`` lines ``total_ms``, ``queue_ms``, ``generate_ms``,
``ttft_ms`` (streamed calls only), ``prompt_tokens``, ``completion_tokens``,
``context_tokens``; from ``tool_phase`` lines ``tool_ms``. No prefill/decode split:
the proxy's backends (verl's ``generate``, the local model) return whole turns, so
``generate_ms`` is prefill + decode, and a streamed answer's ``ttft_ms`` is measured
after generation (it shows the proxy's own time to first byte, not the model's).

Exit status: 0, or 2 when LOGDIR has no profile line at all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# metric -> (line type, how to get the value, unit)
METRICS: dict[str, tuple[str, str, str]] = {
    "total_ms": ("llm_call", "total_ms", "ms"),
    "queue_ms": ("llm_call", "queue_ms", "ms"),
    "generate_ms": ("llm_call", "generate_ms", "ms"),
    "ttft_ms": ("llm_call", "ttft_ms", "ms"),
    "prompt_tokens": ("llm_call", "prompt_tokens", "tokens"),
    "completion_tokens": ("llm_call", "completion_tokens", "tokens"),
    "context_tokens": ("llm_call", "context_tokens", "tokens"),
    "tool_ms": ("tool_phase", "duration_ms", "ms"),
}


def read_events(log_dir: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """All JSON objects with a ``type`` from ``log_dir/*.jsonl`` -> (events, files, skipped lines)."""
    events: list[dict[str, Any]] = []
    files: list[str] = []
    skipped = 0
    for path in sorted(log_dir.glob("*.jsonl")):
        files.append(path.name)
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    skipped += 1  # e.g. a line cut by a crash
                    continue
                if isinstance(event, dict) and "type" in event:
                    events.append(event)
                else:
                    skipped += 1
    return events, files, skipped


def metric_values(events: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """metric -> the finite values found (see module doc)."""
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    for event in events:
        for name, (kind, key, _) in METRICS.items():
            if event.get("type") != kind:
                continue
            value = event.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[name].append(float(value))
    return values


def describe(values: Sequence[float], bins: int = 10) -> dict[str, Any]:
    """n, mean, std, min, max, p50/p90/p95/p99 and a ``bins``-bin histogram of ``values`` (non-empty)."""
    data = np.asarray(values, dtype=float)
    low, high = float(data.min()), float(data.max())
    if high - low <= 1e-9 * max(1.0, abs(high)):
        # (Nearly) constant data: numpy would make bins of float-noise width.
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(data, bins=bins, range=(low, high))
    percent = counts / counts.sum() * 100.0
    return {
        "n": int(data.size),
        "mean": float(data.mean()),
        "std": float(data.std()),
        "min": float(data.min()),
        "max": float(data.max()),
        **{f"p{q}": float(np.percentile(data, q)) for q in (50, 90, 95, 99)},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist(), "percent": percent.tolist()},
    }


def plot_histogram(name: str, unit: str, stats: dict[str, Any], path: Path) -> None:
    """One bar chart: bins on x, percent of calls on y, the percentage written on each bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    hist = stats["histogram"]
    edges = np.asarray(hist["edges"])
    percent = np.asarray(hist["percent"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = float(edges[1] - edges[0]) if len(edges) > 1 and edges[1] > edges[0] else 1.0
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    bars = ax.bar(centers, percent, width=width * 0.92, align="center", color="#4C72B0", edgecolor="black")
    for bar, pct in zip(bars, percent):
        if pct > 0:
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{pct:.1f}%",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(edges)
    ax.set_xticklabels([_fmt(e) for e in edges], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel(f"{name} ({unit})")
    ax.set_ylabel("% of samples")
    ax.set_ylim(0, max(float(percent.max()) * 1.15, 1.0))
    ax.set_title(
        f"{name}: n={stats['n']}  mean={_fmt(stats['mean'])}  std={_fmt(stats['std'])}  "
        f"p50={_fmt(stats['p50'])}  p99={_fmt(stats['p99'])} {unit}",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 100000:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def analyze(log_dir: Path, out_dir: Path, prefix: str = "proxy", bins: int = 10) -> dict[str, Any]:
    """Write the stats JSON and PNGs (module doc); return the stats dict.

    Raises:
        FileNotFoundError: ``log_dir`` does not exist.
        ValueError: no profile line was found.
    """
    if not log_dir.is_dir():
        raise FileNotFoundError(f"no such log directory: {log_dir}")
    events, files, skipped = read_events(log_dir)
    if not events:
        raise ValueError(f"no profile lines in {log_dir}/*.jsonl")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"files": files, "skipped_lines": skipped, "metrics": {}}
    for name, values in metric_values(events).items():
        if not values:
            continue
        stats = {"unit": METRICS[name][2], **describe(values, bins)}
        report["metrics"][name] = stats
        plot_histogram(name, METRICS[name][2], stats, out_dir / f"{prefix}_{name}.png")
    (out_dir / f"{prefix}_stats.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_proxy.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", type=Path, help="directory with the proxy's *.jsonl profile logs")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write (default: LOG_DIR)")
    parser.add_argument("--prefix", default="proxy", help="output file prefix (default: proxy)")
    parser.add_argument("--bins", type=int, default=10, help="histogram bins (default: 10)")
    args = parser.parse_args(argv)
    try:
        report = analyze(args.log_dir, args.out_dir or args.log_dir, args.prefix, args.bins)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header = f"{'metric':<18}{'n':>7}{'mean':>11}{'std':>11}{'min':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}"
    print(header)
    for name, s in report["metrics"].items():
        print(f"{name:<18}{s['n']:>7}" + "".join(f"{s[k]:>11.2f}" for k in ("mean", "std", "min", "p50", "p90", "p99", "max")))
    print(f"wrote {args.prefix}_stats.json and {len(report['metrics'])} PNGs to {args.out_dir or args.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
