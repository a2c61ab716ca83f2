"""What a search leaves: the frontier and the choice among the swept rows, results.csv, results.md and
the quality-vs-latency plot."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune.search import SearchConfig

ROW_FIELDS = ("trial", "transition", "lr", "head_lr_mult", "width", "hit@10", "ndcg@10", "p50_ms", "p99_ms",
              "within_budget", "frontier", "checkpoint")


@dataclass
class SearchReport:
    experiment_dir: Path
    rows: list[dict[str, Any]]  # one per (trained trial, width)
    trials: list[dict[str, Any]]  # one per trial, pruned ones included
    chosen: dict[str, Any] | None  # the row to ship; None when no width meets the budget
    files: dict[str, Path]


def mark_frontier(rows: list[dict[str, Any]]) -> None:
    """Flag rows no other row beats on both NDCG@10 (higher) and p50 latency (lower)."""
    for row in rows:
        row["frontier"] = not any(
            o["ndcg@10"] >= row["ndcg@10"] and o["p50_ms"] <= row["p50_ms"]
            and (o["ndcg@10"] > row["ndcg@10"] or o["p50_ms"] < row["p50_ms"]) for o in rows)


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best NDCG@10 among rows within the budget (all rows without one); ties go to the faster row."""
    return max((r for r in rows if r["within_budget"]), key=lambda r: (r["ndcg@10"], -r["p50_ms"]), default=None)


def describe(row: dict[str, Any]) -> str:
    return (f"transition {row['transition']}, beam width {row['width']} (lr {row['lr']:.2e}, head lr x"
            f"{row['head_lr_mult']:g}): validation N@10 {row['ndcg@10']:.4f}, H@10 {row['hit@10']:.4f}, "
            f"p50 {row['p50_ms']:.2f} ms per request at batch 1")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(report: SearchReport, cfg: SearchConfig, total_steps: int, path: Path) -> None:
    budget = f" within {cfg.latency_budget_ms:g} ms p50" if cfg.objective == "ndcg_within_budget" else ""
    lines = [f"# Tune results: {cfg.name}", "",
             f"Backbone `{cfg.backbone}`, {total_steps} training steps per trial (batch {cfg.batch_size}), "
             f"{len(report.trials)} trials; validation on {cfg.eval_users or 'all'} users; latency = p50/p99 of "
             f"{cfg.latency_requests} requests at batch 1, measured after the search in one pass over the "
             f"finalists, one at a time. Objective: best N@10{budget}.", ""]
    lines.append(f"**Ship:** {describe(report.chosen)}." if report.chosen else
                 f"**No (transition, width) meets the {cfg.latency_budget_ms:g} ms budget.**")
    lines += ["", "| transition | lr | head lr x | width | H@10 | N@10 | p50 ms | p99 ms | frontier |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        mark = " **ship**" if r is report.chosen else ""
        lines.append(f"| {r['transition']} | {r['lr']:.2e} | {r['head_lr_mult']:g} | {r['width']}{mark} | "
                     f"{r['hit@10']:.4f} | {r['ndcg@10']:.4f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{'yes' if r['frontier'] else ''} |")
    lines += ["", "## Trials", "", f"| trial | transition | lr | head lr x | status | steps | best val N@10 "
              f"(beam {cfg.eval_beam}) |", "|---|---|---|---|---|---|---|"]
    for t in report.trials:
        lines.append(f"| {t['trial']} | {t['transition']} | {t['lr']:.2e} | {t['head_lr_mult']:g} | {t['status']} "
                     f"| {t['steps']} | {t['best_val_ndcg@10']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def plot_frontier(report: SearchReport, cfg: SearchConfig, path: Path) -> None:
    """N@10 vs p50 latency: one line per trained trial (coloured by transition), one point per width."""
    # Local: only the plot needs matplotlib, and its backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {t: plt.cm.tab10(i) for i, t in enumerate(sorted({r["transition"] for r in report.rows}))}
    labelled: set[str] = set()
    for trial in report.trials:
        points = sorted((r for r in report.rows if r["trial"] == trial["trial"]), key=lambda r: r["width"])
        if not points:
            continue
        transition = trial["transition"]
        label = None if transition in labelled else transition
        labelled.add(transition)
        ax.plot([p["p50_ms"] for p in points], [p["ndcg@10"] for p in points], "o-", color=colours[transition],
                label=label, alpha=0.9)
        for p in points:
            ax.annotate(str(p["width"]), (p["p50_ms"], p["ndcg@10"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color=colours[transition])
    frontier = sorted((r for r in report.rows if r["frontier"]), key=lambda r: r["p50_ms"])
    ax.step([r["p50_ms"] for r in frontier], [r["ndcg@10"] for r in frontier], "k--", where="post",
            linewidth=0.8, label="frontier")
    if cfg.objective == "ndcg_within_budget":
        ax.axvline(cfg.latency_budget_ms, color="grey", linestyle=":", label=f"budget {cfg.latency_budget_ms:g} ms")
    if report.chosen:
        ax.plot(report.chosen["p50_ms"], report.chosen["ndcg@10"], "*", color="black", markersize=14,
                label=f"ship: {report.chosen['transition']} w={report.chosen['width']}")
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency per request at batch 1 (ms, log scale)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"{cfg.name}: quality vs latency by transition (labels: beam width)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
