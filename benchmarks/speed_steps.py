"""Step time, samples/s, FLOPs and model FLOPs utilisation (MFU) of CCL and backprop per model.

For every registry model at its natural input size, a synthetic batch, one training step exactly
as the train loop runs it (zero_grad, backward, clip + SGD for F and G). CCL and backprop steps
take turns (a, b, a, b, ...) so that machine load hits both; reported are medians over repeats.
MFU = FLOPs of the step (torch.utils.flop_counter.FlopCounterMode: matmuls and convolutions)
/ step time / the matmul rate measured in the same run on the same device (a large square
matmul, measured before and after the models; the median is the denominator).

    python benchmarks/speed_steps.py [--threads 2] [--repeats 15] [--models mlp_mnist,mlp_cifar] [--compile default]
writes benchmarks/results/speed_steps_{cpu,cuda}.json
"""

from __future__ import annotations

import argparse

import torch

from speed_common import (MODELS, Stepper, environment, interleaved_times, matmul_rate, median, setup,
                          write_json)

TARGET_RATIO = 1.2  # CCL step time / backprop step time on the MLP models (paper FLOP ratio 1.07)
TARGET_MFU = 0.40   # mlp_cifar, batch 256, CPU


def bench_model(name: str, device: torch.device, *, batch: int, repeats: int, warmup: int,
                amp: bool, rate: float, budget: float, compile_mode: str | None = None) -> dict:
    """``compile_mode``: None (eager), a torch.compile mode for both methods, or "both": eager and
    compiled steppers of each method ("default" mode on CPU, "reduce-overhead" = CUDA graphs on a
    GPU), all four interleaved in one run."""
    steppers = {m: Stepper(name, m, device, batch=batch, amp=amp) for m in ("ccl", "bp")}
    flops = {m: s.flops() for m, s in steppers.items()}  # eager: also the first (warm-up) step
    if compile_mode == "both":
        for m in ("ccl", "bp"):
            steppers[f"{m}_compiled"] = Stepper(name, m, device, batch=batch, amp=amp)
            flops[f"{m}_compiled"] = flops[m]
        compiled = [k for k in steppers if k.endswith("_compiled")]
    else:
        compiled = list(steppers) if compile_mode else []
    both_mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs on a GPU
    for k in compiled:
        steppers[k].compile(both_mode if compile_mode == "both" else compile_mode)
        steppers[k].step()  # compilation happens here, outside every timing
    pair = sum(median(t) for t in interleaved_times({m: s.step for m, s in steppers.items()}, device,
                                                    warmup=0, repeats=1).values())
    repeats = max(3, min(repeats, int(budget / pair)))  # slow models (CPU convs) get fewer repeats
    times = interleaved_times({m: s.step for m, s in steppers.items()}, device, warmup=warmup, repeats=repeats)
    out: dict = {"batch": batch, "input_shape": list(steppers["ccl"].model.input_shape), "repeats": repeats}
    for m in steppers:
        t = median(times[m])
        out[m] = {"step_ms_median": 1e3 * t, "step_ms_all": [round(1e3 * v, 3) for v in times[m]],
                  "samples_per_s": batch / t, "flops_per_step": flops[m], "flops_per_sample": flops[m] / batch,
                  "achieved_flops_per_s": flops[m] / t, "mfu": flops[m] / t / rate}
    out["ratio_ccl_over_bp_step_time"] = out["ccl"]["step_ms_median"] / out["bp"]["step_ms_median"]
    pairs = [c / b for c, b in zip(times["ccl"], times["bp"])]  # each CCL step against the BP step after it
    out["ratio_ccl_over_bp_paired_median"] = median(pairs)
    out["ratio_ccl_over_bp_flops"] = flops["ccl"] / flops["bp"]
    if compile_mode == "both":
        ms = {k: out[k]["step_ms_median"] for k in steppers}
        out["ratio_compiled_ccl_over_compiled_bp"] = ms["ccl_compiled"] / ms["bp_compiled"]
        # The fairest single number: each method in its faster form.
        out["ratio_best_ccl_over_best_bp"] = min(ms["ccl"], ms["ccl_compiled"]) / min(ms["bp"], ms["bp_compiled"])
        out["compile_speedup"] = {m: ms[m] / ms[f"{m}_compiled"] for m in ("ccl", "bp")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the JSON's name, e.g. _t1")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed steps per model at most (min 3 repeats)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=0, help="override every model's batch (0 = per-model default)")
    p.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto", help="bf16 autocast; auto = CUDA only")
    p.add_argument("--compile", choices=("off", "default", "reduce-overhead", "both"), default="off",
                   help="time both methods with the loss computation under torch.compile (as train.compile=true); "
                        "'both': eager and compiled side by side in one run")
    args = p.parse_args()
    device = setup(args.threads)
    amp = device.type == "cuda" if args.amp == "auto" else args.amp == "bf16"
    mm_dtype = torch.bfloat16 if amp else torch.float32
    rates = [matmul_rate(device, dtype=mm_dtype)]
    results: dict = {}
    for name in args.models.split(","):
        shape, cpu_batch, gpu_batch = MODELS[name]
        batch = args.batch or (gpu_batch if device.type == "cuda" else cpu_batch)
        r = bench_model(name, device, batch=batch, repeats=args.repeats, warmup=args.warmup, amp=amp,
                        rate=rates[0], budget=args.budget,
                        compile_mode=None if args.compile == "off" else args.compile)
        results[name] = r
        print(f"{name:12s} batch {batch:4d} x{r['repeats']:<3d} CCL {r['ccl']['step_ms_median']:8.2f} ms  BP {r['bp']['step_ms_median']:8.2f} ms"
              f"  ratio {r['ratio_ccl_over_bp_step_time']:.3f} (paired {r['ratio_ccl_over_bp_paired_median']:.3f})"
              f"  FLOP ratio {r['ratio_ccl_over_bp_flops']:.3f}  MFU CCL {r['ccl']['mfu']:.1%} BP {r['bp']['mfu']:.1%}",
              flush=True)
        if "ccl_compiled" in r:
            print(f"{'':12s} compiled: CCL {r['ccl_compiled']['step_ms_median']:8.2f} ms  BP "
                  f"{r['bp_compiled']['step_ms_median']:8.2f} ms  ratio {r['ratio_compiled_ccl_over_compiled_bp']:.3f}"
                  f"  best CCL / best BP {r['ratio_best_ccl_over_best_bp']:.3f}", flush=True)
    rates.append(matmul_rate(device, dtype=mm_dtype))
    rate = median(rates)
    for r in results.values():  # MFU against the median of the matmul rates around the models
        for v in r.values():
            if isinstance(v, dict) and "achieved_flops_per_s" in v:
                v["mfu"] = v["achieved_flops_per_s"] / rate
    mlps = [n for n in results if n.startswith("mlp_")]
    targets = {
        "ccl_over_bp_step_time_mlp_max": max((results[n]["ratio_ccl_over_bp_step_time"] for n in mlps), default=None),
        "ccl_over_bp_target": TARGET_RATIO,
    }
    if args.compile == "both":
        targets["ccl_over_bp_compiled_mlp_max"] = max(
            (results[n]["ratio_compiled_ccl_over_compiled_bp"] for n in mlps), default=None)
        targets["best_ccl_over_best_bp_mlp_max"] = max(
            (results[n]["ratio_best_ccl_over_best_bp"] for n in mlps), default=None)
    if "mlp_cifar" in results:
        targets["mfu_mlp_cifar"] = {m: results["mlp_cifar"][m]["mfu"] for m in ("ccl", "bp")}
        targets["mfu_target"] = TARGET_MFU
        targets["mfu_mlp_cifar_batch"] = results["mlp_cifar"]["batch"]
    payload = {"benchmark": "speed_steps", "env": environment(device, args.threads), "amp": "bf16" if amp else "off",
               "compile": args.compile,
               "matmul_rate_flops_per_s": rate, "matmul_rates": rates, "matmul_dtype": str(mm_dtype),
               "repeats": args.repeats, "warmup": args.warmup, "models": results, "targets": targets}
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s ({', '.join(f'{r / 1e9:.1f}' for r in rates)}); targets: {targets}")
    write_json(f"speed_steps_{device.type}{args.tag}.json", payload)


if __name__ == "__main__":
    main()
