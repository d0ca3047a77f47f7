"""Markdown tables of the speed benchmarks' JSON files, as they appear in docs/results_speed.md.

    python benchmarks/speed_tables.py                          # every speed JSON in benchmarks/results
    python benchmarks/speed_tables.py speed_steps_cpu_mlp_quiet.json epoch_mnist_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("CCL_REPR_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
PREFIXES = ("speed_steps_", "speed_floor_", "memory_depth_", "epoch_mnist_")


def _title(name: str, d: dict, extra: str) -> str:
    env = d["env"]
    return (f"**{name} — threads {env['threads']}, load avg {env['load_average_1m']:.1f}, "
            f"{env['time_utc']}{extra}**")


def _header(*columns: str) -> list[str]:
    """A Markdown table's header row and its separator, sized from the columns."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def speed_steps(name: str, d: dict) -> str:
    extra = f", matmul rate {d['matmul_rate_flops_per_s'] / 1e9:.1f} GFLOP/s"
    if d.get("compile") == "both":
        extra += ", eager and torch.compile'd steps of both methods interleaved"
    elif d.get("compile", "off") != "off":
        extra += f", both methods under torch.compile ({d['compile']})"
    lines = [_title(name, d, extra),
             *_header("model", "batch", "repeats", "CCL step ms", "BP step ms", "CCL/BP (medians)",
                      "CCL/BP (paired median)", "CCL samples/s", "BP samples/s", "FLOP/sample CCL",
                      "FLOP/sample BP", "MFU CCL", "MFU BP")]
    for model, r in d["models"].items():
        c, b = r["ccl"], r["bp"]
        lines.append(f"| {model} | {r['batch']} | {r['repeats']} | {c['step_ms_median']:.2f} | {b['step_ms_median']:.2f} "
                     f"| {r['ratio_ccl_over_bp_step_time']:.3f} | {r['ratio_ccl_over_bp_paired_median']:.3f} "
                     f"| {_rate(c['samples_per_s'])} | {_rate(b['samples_per_s'])} | {c['flops_per_sample'] / 1e6:.2f} M "
                     f"| {b['flops_per_sample'] / 1e6:.2f} M | {c['mfu']:.1%} | {b['mfu']:.1%} |")
    if d.get("compile") == "both":
        lines += ["", *_header("model", "CCL eager ms", "CCL compiled ms", "BP eager ms", "BP compiled ms",
                               "CCL/BP eager", "CCL/BP compiled", "best CCL / best BP")]
        for model, r in d["models"].items():
            ms = {k: r[k]["step_ms_median"] for k in ("ccl", "ccl_compiled", "bp", "bp_compiled")}
            lines.append(f"| {model} | {ms['ccl']:.2f} | {ms['ccl_compiled']:.2f} | {ms['bp']:.2f} "
                         f"| {ms['bp_compiled']:.2f} | {r['ratio_ccl_over_bp_step_time']:.3f} "
                         f"| {r['ratio_compiled_ccl_over_compiled_bp']:.3f} | {r['ratio_best_ccl_over_best_bp']:.3f} |")
    return "\n".join(lines)


def memory_depth(name: str, d: dict) -> str:
    r, mib = d["results"], (lambda v: f"{v / 2 ** 20:.3f}")
    lines = [f"**{name} — batch {d['batch']}, width {d['width']}, method: {d['method']}**",
             *_header("hidden layers", "BP step peak MiB", "CCL summed MiB", "CCL layer-wise MiB",
                      "params+grads BP MiB", "params+grads CCL MiB")]
    for depth in map(str, d["depths"]):
        lines.append(f"| {depth} | {mib(r['bp'][depth]['step_peak_bytes'])} "
                     f"| {mib(r['ccl_summed'][depth]['step_peak_bytes'])} "
                     f"| {mib(r['ccl_layerwise'][depth]['step_peak_bytes'])} "
                     f"| {mib(r['bp'][depth]['params_and_grads_bytes'])} "
                     f"| {mib(r['ccl_summed'][depth]['params_and_grads_bytes'])} |")
    return "\n".join(lines)


def epoch_mnist(name: str, d: dict) -> str:
    lines = [_title(name, d, ""),
             *_header("method", "steps", "epoch loop s", "full epoch s (+val, ckpt)", "pure compute s", "data s",
                      "loop/compute", "full/compute", "paired loop/compute")]
    for m in ("ccl", "bp"):
        r = d["results"][m]
        med = r["median"]
        lines.append(f"| {m} | {r['steps']} | {med['loop']:.2f} | {med['full']:.2f} | {med['compute']:.2f} "
                     f"| {med['data']:.3f} | {r['loop_over_compute']:.3f} | {r['full_over_compute']:.3f} "
                     f"| {r['paired_loop_over_compute']:.3f} |")
    return "\n".join(lines)


def speed_floor(name: str, d: dict) -> str:
    lines = [_title(name, d, ""),
             *_header("model", "batch", "repeats", "library CCL ms", "library BP ms", "library CCL/BP",
                      "hand-written CCL ms", "hand-written BP ms", "hand-written CCL/BP", "framework share CCL",
                      "framework share BP")]
    for model, r in d["models"].items():
        ms, share = r["step_ms_median"], r["framework_share"]
        lines.append(f"| {model} | {r['batch']} | {r['repeats']} | {ms['library_ccl']:.2f} | {ms['library_bp']:.2f} "
                     f"| {r['ratio_library']:.3f} | {ms['floor_ccl']:.2f} | {ms['floor_bp']:.2f} "
                     f"| {r['ratio_floor']:.3f} | {share['ccl']:.0%} | {share['bp']:.0%} |")
    return "\n".join(lines)


def table(path: Path) -> str:
    d = json.loads(path.read_text())
    kind = d.get("benchmark") or next(p.rstrip("_") for p in PREFIXES if path.name.startswith(p))
    return {"speed_steps": speed_steps, "speed_floor": speed_floor, "memory_depth": memory_depth,
            "epoch_mnist": epoch_mnist}[kind](path.name, d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="JSON names in benchmarks/results (default: all speed JSONs)")
    args = p.parse_args()
    paths = [RESULTS / f for f in args.files] or sorted(
        f for f in RESULTS.glob("*.json") if f.name.startswith(PREFIXES))
    missing = [str(f) for f in paths if not f.is_file()]
    if missing:
        raise SystemExit(f"no such results file: {', '.join(missing)}; run the benchmark first (see docs/results_speed.md)")
    print("\n\n".join(table(f) for f in paths))


if __name__ == "__main__":
    main()
