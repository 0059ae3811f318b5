"""``report.md`` (ratio tables), the ratio chart, and run-to-run comparison."""

from __future__ import annotations

from collections import defaultdict

from benchmarks.harness import IMPLS, OURS


def _groups(records):
    groups = defaultdict(dict)
    for r in records:
        # the sparse family's density axis shows as the shape's last entry
        density = (r["density"],) if r.get("density") is not None else ()
        groups[(r["op"], r["mode"], r["dtype"], tuple(r["shape"]) + density)][r["impl"]] = r
    return groups


def ratios(results: dict) -> dict:
    """``{(op, mode, dtype, shape, name): ratio}`` for ours/dense and paper|reference/ours."""
    out = {}
    for key, impls in _groups(results["records"]).items():
        dense = impls.get("dense")
        for ours in OURS:
            if ours not in impls:
                continue
            t = impls[ours]["median_ms"]
            if dense:
                out[key + (f"{ours}/dense",)] = t / dense["median_ms"]
            for base in ("paper", "paper-sync", "reference", "native-dense", "torch-sparse"):
                if base in impls:
                    out[key + (f"{base}/{ours}",)] = impls[base]["median_ms"] / t
    return out


def write_report(results: dict, path: str) -> None:
    lines = [
        "# Benchmark report",
        "",
        f"device: {results['device']}; torch {results['torch']}; commit {results['commit']}",
        "",
        "Median milliseconds per call (interleaved rounds); ratios from the same run.",
        "`ours/dense` < 1 is faster than dense; `paper/ours` > 1 means ours is that many times faster",
        "than the paper's algorithm in plain PyTorch.",
    ]
    groups = _groups(results["records"])
    by_table = defaultdict(list)
    for (op, mode, dtype, shape), impls in groups.items():
        by_table[(op, mode, dtype)].append((shape, impls))
    for (op, mode, dtype), rows in by_table.items():
        present = [i for i in IMPLS if any(i in impls for _, impls in rows)]
        ours = [o for o in OURS if o in present]
        ratio_cols = [f"{o}/dense" for o in ours if "dense" in present] + [
            f"{b}/{o}"
            for o in ours
            for b in ("paper", "reference", "native-dense", "torch-sparse")
            if b in present
        ]
        lines += ["", f"## {op} {mode} ({dtype})", ""]
        lines.append("| shape | " + " | ".join(present + ratio_cols) + " |")
        lines.append("|---" * (1 + len(present) + len(ratio_cols)) + "|")
        for shape, impls in rows:
            cells = [f"{impls[i]['median_ms']:.3f}" if i in impls else "" for i in present]
            for col in ratio_cols:
                num, den = col.split("/")
                if num in impls and den in impls:
                    cells.append(f"{impls[num]['median_ms'] / impls[den]['median_ms']:.2f}")
                else:
                    cells.append("")
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
