"""``report.md`` (ratio tables), the ratio chart, and run-to-run comparison."""

from __future__ import annotations

import statistics
from collections import defaultdict

from benchmarks.harness import IMPLS, OURS

BASES = (
    "paper",
    "paper-sync",
    "reference",
    "dense-cl",
    "native-dense",
    "native-unfused",
    "torch-sparse",
    "sparseprop",
    "sparseprop-on",
)


def _key(r):
    # the sparse family's density axis shows as the shape's last entry
    density = (r["density"],) if r.get("density") is not None else ()
    return (r["op"], r["mode"], r["dtype"], tuple(r["shape"]) + density)


def _groups(records, run=None):
    """``{case key: {impl: record}}`` of one run (records without a run number are run 0)."""
    groups = defaultdict(dict)
    runs = _runs(records)
    pick = runs[0] if run is None and runs else run
    for r in records:
        if r.get("run", 0) == pick:
            groups[_key(r)][r["impl"]] = r
    return groups


def _runs(records) -> list[int]:
    return sorted({r.get("run", 0) for r in records})


def _ratios_of(groups) -> dict:
    out = {}
    for key, impls in groups.items():
        dense = impls.get("dense")
        for ours in OURS:
            if ours not in impls:
                continue
            t = impls[ours]["median_ms"]
            if dense:
                out[key + (f"{ours}/dense",)] = t / dense["median_ms"]
            for base in BASES:
                if base in impls:
                    out[key + (f"{base}/{ours}",)] = impls[base]["median_ms"] / t
    return out


def ratio_runs(results: dict) -> dict:
    """``{(op, mode, dtype, shape, name): [ratio of each run]}``: each ratio measured within one run."""
    out = defaultdict(list)
    for run in _runs(results["records"]):
        for key, value in _ratios_of(_groups(results["records"], run)).items():
            out[key].append(value)
    return dict(out)


def ratios(results: dict) -> dict:
    """``{(op, mode, dtype, shape, name): ratio}`` for ours/dense and paper|reference/ours: the
    median over the runs (the one run's ratio when there is one)."""
    return {key: statistics.median(values) for key, values in ratio_runs(results).items()}


def _machine_lines(results: dict) -> list[str]:
    m = results.get("machine")
    if not m:
        return []
    lines = [
        f"machine: {m['cpu']}; ISA flags {' '.join(m['isa_flags']) or 'none'}; {m['cores']} cores, "
        f"{m['threads']} threads; ATen CPU capability {m['aten_cpu_capability']}; dst_kernels CPU "
        f"kernels {m['dst_cpu_isa']}",
    ]
    runs = results.get("runs") or []
    if runs:
        loads = ", ".join(f"{r['load_before']:.2f}-{r['load_after']:.2f}" for r in runs)
        lines.append(
            f"runs: {len(runs)}; 1-minute load average before-after each run "
            f"(its own threads included): {loads}"
        )
    return lines


def write_report(results: dict, path: str) -> None:
    runs = _runs(results["records"])
    spread = len(runs) > 1
    lines = [
        "# Benchmark report",
        "",
        f"device: {results['device']}; torch {results['torch']}; commit {results['commit']}",
        *_machine_lines(results),
        "",
        "Median milliseconds per call (interleaved rounds); ratios from the same run.",
        "`ours/dense` < 1 is faster than dense; `paper/ours` > 1 means ours is that many times faster",
        "than the paper's algorithm in plain PyTorch.",
    ]
    if spread:
        lines.append(
            f"Over {len(runs)} runs: times are the first run's; each ratio is its median over the runs "
            f"with the min-max in brackets."
        )
    per_run = ratio_runs(results)
    groups = _groups(results["records"])
    by_table = defaultdict(list)
    for (op, mode, dtype, shape), impls in groups.items():
        by_table[(op, mode, dtype)].append((shape, impls))
    for (op, mode, dtype), rows in by_table.items():
        present = [i for i in IMPLS if any(i in impls for _, impls in rows)]
        ours = [o for o in OURS if o in present]
        ratio_cols = [f"{o}/dense" for o in ours if "dense" in present] + [
            f"{b}/{o}" for o in ours for b in BASES if b in present and b != "paper-sync"
        ]
        lines += ["", f"## {op} {mode} ({dtype})", ""]
        lines.append("| shape | " + " | ".join(present + ratio_cols) + " |")
        lines.append("|---" * (1 + len(present) + len(ratio_cols)) + "|")
        for shape, impls in rows:
            cells = [f"{impls[i]['median_ms']:.3f}" if i in impls else "" for i in present]
            for col in ratio_cols:
                values = per_run.get((op, mode, dtype, shape, col))
                if not values:
                    cells.append("")
                elif spread:
                    cells.append(f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]")
                else:
                    cells.append(f"{values[0]:.2f}")
            lines.append(f"| {'x'.join(map(str, shape))} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted((k, v) for k, v in ratios(results).items() if k[-1].endswith("/dense"))
    if not items:
        return
    labels = [
        f"{op} {mode} {dtype} {'x'.join(map(str, shape))} [{name}]"
        for (op, mode, dtype, shape, name), _ in items
    ]
    values = [v for _, v in items]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(items) + 1.5), dpi=110)
    ax.barh(range(len(items)), values, color=["tab:green" if v <= 1.05 else "tab:orange" for v in values])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.set_xlabel("time relative to dense (lower is better)")
    ax.set_title(f"dst_kernels vs dense: {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(old: dict, new: dict, threshold: float = 0.10) -> list[str]:
    """Ratios of ``new`` that got more than ``threshold`` worse than in ``old``."""
    before, after = ratios(old), ratios(new)
    worse = []
    for key, value in after.items():
        if key not in before:
            continue
        prev = before[key]
        higher_is_worse = key[-1].endswith("/dense")
        change = value / prev - 1.0 if higher_is_worse else prev / value - 1.0
        if change > threshold:
            op, mode, dtype, shape, name = key
            worse.append(
                f"{op} {mode} {dtype} {shape} {name}: {prev:.3f} -> {value:.3f} ({100 * change:+.0f} %)"
            )
    return worse
