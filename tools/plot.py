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


def save(fig, out, title):
    """Every plot ends alike: the run's title on top, tight layout, a PNG at 90 dpi."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print("wrote", out)


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
    save(fig, out, title)


def shape_of(path):
    """(nodes, ranks per node) from a name like cluster_4x2.csv, else None."""
    import re
    m = re.search(r"(\d+)x(\d+)", os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else None


def plot_cluster(rows, out, title, shape, link):
    """Flat, two-level and bare MPI_Allreduce against the wire bound: the bytes each node must
    send across once, 2 (N-1)/N S (S for 2 nodes), at the link rate."""
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    nodes = shape[0] if shape else 2
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"bare_allreduce": ("k", "--", "bare MPI_Allreduce"),
              "hma_flat": ("tab:orange", "-", "hma flat"),
              "hma_two_level": ("tab:blue", "-", "hma two-level")}
    xs = sorted({float(r["bytes"]) for r in rows})
    for variant, (color, ls, label) in styles.items():
        if variant in by:
            pts = sorted((float(r["bytes"]), float(r["median_us"]) / 1e3) for r in by[variant])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls, marker="o", label=label)
    ax.plot(xs, [2 * (nodes - 1) / nodes * x / link * 1e3 for x in xs], color="tab:green", ls=":",
            label=f"wire bound ({link * 8 / 1e9:g} Gbit/s)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([human(x) for x in xs], fontsize=8)
    ax.set_xlabel("buffer size")
    ax.set_ylabel("ms per average (median, slowest rank)")
    where = f"{shape[0]} nodes x {shape[1]} ranks" if shape else "cluster"
    ax.set_title(f"emulated cluster, {where}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out, title)


def plot_model(rows, out, title):
    """Predicted against measured (tools/model-check), the +-20 % band around equality."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    marks = {"flat": "s", "two-level": "o"}
    colors = {}
    for r in rows:
        key = (r["rate"], r["shape"])
        colors.setdefault(key, f"C{len(colors)}")
    for (rate, shape), color in colors.items():
        for alg, mk in marks.items():
            sel = [r for r in rows if r["rate"] == rate and r["shape"] == shape and r["algorithm"] == alg]
            if sel:
                ax.scatter([float(r["measured_us"]) / 1e3 for r in sel], [float(r["predicted_us"]) / 1e3 for r in sel],
                           color=color, marker=mk, label=f"{rate} {shape} {alg}", s=25)
    lo = min(min(float(r["measured_us"]), float(r["predicted_us"])) for r in rows) / 1e3 / 1.5
    hi = max(max(float(r["measured_us"]), float(r["predicted_us"])) for r in rows) / 1e3 * 1.5
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.8, hi * 0.8], [lo * 1.2, hi * 1.2], color="k", alpha=0.08, label="+-20 %")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms (calibrated once on 2 x 2)")
    ax.set_title("cost model against the emulated cluster")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save(fig, out, title)


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
    save(fig, out, title)


def plot_convergence(rows, out, title):
    """hma-bench-convergence --curve: loss against steps and against bytes moved, per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        steps = [int(r["step"]) for r in pts]
        loss = [float(r["loss"]) for r in pts]
        moved = [max(float(r["bytes_moved"]), 1.0) for r in pts]
        a1.plot(steps, loss, label=m, lw=1.2)
        a2.plot(moved, loss, label=m, lw=1.2)
    a1.set_xlabel("step")
    a2.set_xlabel("bytes moved per rank (2(g-1)/g of each average's wire bytes)")
    a2.set_xscale("log")
    for a in (a1, a2):
        a.set_ylabel("loss of the world-mean model")
        a.grid(alpha=0.3)
    lo = min(float(r["loss"]) for r in rows)
    hi = sorted(float(r["loss"]) for r in rows)[len(rows) // 2]
    for a in (a1, a2):
        a.set_ylim(lo - 0.02 * (hi - lo + 1e-9), hi + 0.5 * (hi - lo + 1e-9))
    a1.legend(fontsize=7)
    a1.set_title(f"local SGD, np {rows[0]['np']}: loss against steps", fontsize=9)
    a2.set_title("loss against communication", fontsize=9)
    save(fig, out, title)


def plot_convergence_table(rows, out, title):
    """hma-bench-convergence --csv: final loss against bytes moved, one point per method."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        x, y = max(float(r["bytes_moved"]), 1.0), float(r["final_loss"])
        ax.scatter([x], [y])
        ax.annotate(r["method"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes moved per rank")
    ax.set_ylabel("final loss")
    ax.grid(alpha=0.3)
    ax.set_title(f"final loss against communication, np {rows[0]['np']}, {rows[0]['steps']} steps", fontsize=9)
    save(fig, out, title)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv", nargs="+", help="CSV files from hma-bench-average / hma-bench-schedule")
    ap.add_argument("-o", "--outdir", default=".")
    ap.add_argument("--title", default="")
    ap.add_argument("--link-bytes-per-s", type=float, default=125e6,
                    help="cluster files (two-level variants): the link rate of the wire bound")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    for path in a.csv:
        rows = read(path)
        if not rows:
            sys.exit(f"plot: {path} has no rows")
        base = os.path.join(a.outdir, os.path.splitext(os.path.basename(path))[0])
        if "loss" in rows[0] and "step" in rows[0]:
            plot_convergence(rows, base + ".png", a.title)
        elif "final_loss" in rows[0]:
            plot_convergence_table(rows, base + ".png", a.title)
        elif "predicted_us" in rows[0]:
            plot_model(rows, base + ".png", a.title)
        elif "variant" in rows[0] and any(r["variant"] == "hma_two_level" for r in rows):
            plot_cluster(rows, base + ".png", a.title, shape_of(path), a.link_bytes_per_s)
        elif "variant" in rows[0]:
            plot_average(rows, base + ".png", a.title)
        elif "schedule" in rows[0]:
            plot_schedule(rows, base + ".png", a.title)
        else:
            sys.exit(f"plot: {path} is not a CSV of hma-bench-average or hma-bench-schedule")


if __name__ == "__main__":
    main()
