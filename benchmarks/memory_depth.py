"""Peak memory of one training step as the MLP deepens: backprop, CCL (summed loss) and CCL with
``train.layerwise`` (each pair loss backpropagated as soon as it exists).

The model is mlp_mnist's MLP (784 -> 256 x depth -> 10, no bias, ELU) at batch 256, for depth
4, 8, 16, 32 hidden layers. Measured: the peak bytes allocated during one step (forward,
backward, clip, SGD step) above what was allocated when the step began. Parameters, their
gradient buffers (kept allocated, zeroed in place) and the optimiser's state are the model's
resident state, reported separately; they grow with depth for every method. Method:
CUDA: torch.cuda.max_memory_allocated. CPU: every allocation and free the PyTorch CPU allocator
reports to torch.profiler (profile_memory=True), replayed in time order (speed_common.py).

    python benchmarks/memory_depth.py [--threads 2] [--batch 256] [--depths 4,8,16,32]
writes benchmarks/results/memory_depth_{cpu,cuda}.json
"""

from __future__ import annotations

import argparse

from speed_common import Stepper, environment, peak_step_memory, setup, tensor_bytes, write_json

TARGET_GROWTH = 1.25  # CCL (layer-wise) peak at depth 32 / depth 4
VARIANTS = {"bp": ("bp", False), "ccl_summed": ("ccl", False), "ccl_layerwise": ("ccl", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the JSON's name, e.g. _t1")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depths", default="4,8,16,32")
    p.add_argument("--repeats", type=int, default=3, help="steps measured per point (the maximum is kept)")
    args = p.parse_args()
    device = setup(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    rows: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for depth in depths:
        for variant, (method, layerwise) in VARIANTS.items():
            s = Stepper("mlp_mnist", method, device, batch=args.batch, widths=[args.width] * depth, layerwise=layerwise)
            s.step(keep_grads=True)  # allocate gradient buffers (and any optimiser state) first
            peak = max(peak_step_memory(lambda: s.step(keep_grads=True), device) for _ in range(args.repeats))
            params = list(s.model.parameters())
            state = tensor_bytes(params) + tensor_bytes([q.grad for q in params if q.grad is not None])
            rows[variant][depth] = {"step_peak_bytes": peak, "params_and_grads_bytes": state,
                                    "total_peak_bytes": peak + state}
            print(f"depth {depth:3d} {variant:14s} step peak {peak / 2**20:8.3f} MiB   params+grads "
                  f"{state / 2**20:8.3f} MiB", flush=True)
    lo, hi = depths[0], depths[-1]
    growth = {v: {"step_peak": r[hi]["step_peak_bytes"] / r[lo]["step_peak_bytes"],
                  "total_peak": r[hi]["total_peak_bytes"] / r[lo]["total_peak_bytes"]} for v, r in rows.items()}
    for v, g in growth.items():
        print(f"{v:14s} depth {lo} -> {hi}: step peak x{g['step_peak']:.2f}, with params+grads x{g['total_peak']:.2f}")
    write_json(f"memory_depth_{device.type}{args.tag}.json", {
        "benchmark": "memory_depth", "env": environment(device, args.threads), "batch": args.batch,
        "width": args.width, "depths": depths, "method": "cuda.max_memory_allocated" if device.type == "cuda"
        else "torch.profiler profile_memory allocation events, replayed", "results": rows, "growth": growth,
        "target": {"ccl_layerwise_step_peak_growth_max": TARGET_GROWTH,
                   "met": growth["ccl_layerwise"]["step_peak"] <= TARGET_GROWTH}})


if __name__ == "__main__":
    main()
