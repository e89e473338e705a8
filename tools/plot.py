"""Plots for hma's benchmark CSV files; run through tools/plot."""
import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def human(b):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024:
            return f"{b:g} {unit}"
        b /= 1024
    return f"{b:g} TiB"


def plot_average(rows, out, title):
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    np_ = rows[0]["np"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"bare_allreduce": ("k", "--", "bare MPI_Allreduce"),
              "hma_contiguous": ("tab:blue", "-", "hma contiguous"),
              "hma_scattered": ("tab:orange", "-", "hma scattered (100 arrays)"),
              "hma_start_wait": ("tab:green", "-", "hma start/wait"),
              "bare_iallreduce_wait": ("tab:gray", ":", "bare MPI_Iallreduce+wait")}
    for variant, (color, ls, label) in styles.items():
        if variant not in by:
            continue
        xs = [float(r["bytes"]) for r in by[variant]]
        ax1.plot(xs, [float(r["busbw_GBps"]) for r in by[variant]], color=color, ls=ls, marker=".", label=label)
        if variant != "bare_allreduce":
            ax2.plot(xs, [float(r["ratio_to_bare"]) for r in by[variant]], color=color, ls=ls, marker=".", label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ticks = sorted({float(r["bytes"]) for r in rows})[::2]
        ax.set_xticks(ticks)
        ax.set_xticklabels([human(t) for t in ticks], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("buffer size")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("busbw (GB/s), nccl-tests convention")
    ax1.set_title(f"bus bandwidth, np {np_}")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("time / bare MPI_Allreduce")
    ax2.set_title("ratio to the floor (lower is better)")
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print("wrote", out)


def plot_schedule(rows, out, title):
    labels = sorted({r["schedule"] for r in rows}, key=lambda s: [r["schedule"] for r in rows].index(s))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for i, mode in enumerate(("blocking", "overlap")):
        vals = []
        for lab in labels:
            v = [float(r["comm_us_per_step"]) for r in rows if r["schedule"] == lab and r["mode"] == mode]
            vals.append(max(v[0], 0) if v else 0)
        ax.bar([j + (i - 0.5) * width for j in range(len(labels))], vals, width, label=mode)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("communication µs per step")
    ax.set_title(f"per-step communication, np {rows[0]['np']}, {human(float(rows[0]['bytes']))}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print("wrote", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv", nargs="+", help="CSV files from hma-bench-average / hma-bench-schedule")
    ap.add_argument("-o", "--outdir", default=".")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    for path in a.csv:
        rows = read(path)
        if not rows:
            sys.exit(f"plot: {path} has no rows")
        base = os.path.join(a.outdir, os.path.splitext(os.path.basename(path))[0])
        if "variant" in rows[0]:
            plot_average(rows, base + ".png", a.title)
        elif "schedule" in rows[0]:
            plot_schedule(rows, base + ".png", a.title)
        else:
            sys.exit(f"plot: {path} is not a CSV of hma-bench-average or hma-bench-schedule")


if __name__ == "__main__":
    main()
