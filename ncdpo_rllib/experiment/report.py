"""``ncdpo compare``'s outputs: the summary table (Markdown, CSV), the curve plots and the HTML report."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any, Optional, Sequence

from .curves import Band

NOT_REACHED = "not reached"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (the one helper for ncdpo compare and the benchmark scripts)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(m: Optional[float], s: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if m is None else f"{fmt.format(m)} ± {fmt.format(s or 0.0)}"


def format_row(row: dict[str, Any]) -> dict[str, str]:
    """Human-readable cells: mean ± std, 'not reached (0/n)', k/n when some runs missed."""
    n = row["runs"]
    if row["threshold"] is None:
        steps_cell = wall_cell = "- (no threshold)"
    elif not row["reached"]:
        steps_cell = wall_cell = f"{NOT_REACHED} (0/{n})"
    else:
        k = f" ({row['reached']}/{n})"
        steps_cell = _pm(row["env_steps_to_threshold_mean"], row["env_steps_to_threshold_std"], "{:,.0f}") + k
        wall_cell = _pm(row["wall_s_to_threshold_mean"], row["wall_s_to_threshold_std"], "{:.1f}") + k
    tput = row["env_steps_per_s_mean"]
    return {
        "group": row["group"],
        "runs": str(n),
        "final": _pm(row["final_mean"], row["final_std"]),
        "best": _pm(row["best_mean"], row["best_std"]),
        "env steps to threshold": steps_cell,
        "wall s to threshold": wall_cell,
        "env steps/s": "-" if tput is None else f"{tput:,.0f}",
    }


def summary_table(rows: Sequence[dict[str, Any]], metric: str, threshold: Optional[float]) -> str:
    """The summary as a Markdown table with a one-line header saying what the numbers are."""
    cells = [format_row(r) for r in rows]
    cols = list(cells[0]) if cells else []
    head = (f"Metric `{metric}`; final = last logged value, best = max, mean ± std over runs"
            + (f"; threshold {threshold:g}" if threshold is not None else "") + ".\n\n")
    return head + markdown_table(cols, [[c[k] for k in cols] for c in cells]) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Raw numbers (empty cell = not applicable / not reached) for spreadsheets and scripts."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})


def plot_bands(bands: dict[str, Band], xlabel: str, ylabel: str, path: Path,
               threshold: Optional[float] = None) -> list[str]:
    """One mean line + min..max band per group; returns the group labels of the lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    try:
        for label, b in bands.items():
            if len(b.x) == 0:
                continue
            (line,) = ax.plot(b.x, b.mean, label=label, marker="o" if len(b.x) == 1 else None)
            ax.fill_between(b.x, b.lo, b.hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label="_threshold")
        ax.set_title(f"{ylabel}: mean over runs, band = min..max", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        return [str(l.get_label()) for l in ax.get_lines() if not str(l.get_label()).startswith("_")]
    finally:
        plt.close(fig)


def render_html(title: str, images: Sequence[Path], table_md: str, rows: Sequence[dict[str, Any]],
                selection: str, command: str, notes: Sequence[str], profiles: Sequence[str] = ()) -> str:
    """A self-contained page: PNGs inlined as base64, the table, the selection and the command."""
    esc = html.escape
    cells = [format_row(r) for r in rows]
    cols = list(cells[0]) if cells else []
    table = ("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c[k])}</td>" for k in cols) + "</tr>" for c in cells)
             + "</table>")
    imgs = "".join(
        f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(p.name)}</figcaption></figure>'
        for p in images
    )
    caption = esc(table_md.split("\n", 1)[0])
    note_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}code,pre{{background:#f4f4f4}}</style>
</head><body><h1>{esc(title)}</h1>
{imgs}
<p>{caption}</p>{table}
<p>Curves: mean over the runs of a group, band = min..max over runs, on the step (or wall-clock)
range all runs of the group cover (linear interpolation onto a common grid).</p>
{"".join(f"<h2>Latency and memory vs K</h2><pre>{esc(t)}</pre>" for t in profiles)}
<h2>Selection</h2><pre>{esc(selection)}</pre>
<h2>Command</h2><pre>{esc(command)}</pre>
{f"<h2>Notes</h2><ul>{note_html}</ul>" if notes else ""}
</body></html>
"""
