"""A scaling model of model-parallel CCL (ccl_repr.parallel): time per step on K workers from each
layer's compute and the size of the messages between blocks, checked against the 2-rank CPU
measurements and used to predict 4 and 8 GPUs on the paper's CNN and conv autoencoder.

The model. Layer l costs c_l = 2 (f_l + g_l) FLOPs per CCL step: F's U_l forward on the batch
(f_l) and its weight gradient, G's V_l forward on G's batch (g_l: the C class prototypes, or the
N images of an autoencoder) and its weight gradient. Every input is detached (the paper's Eq. 2),
so no layer computes a gradient for its input. Backprop's step is about 3 f_l per layer (forward,
input gradient, weight gradient), less the first layer's input gradient. On a worker that does
R FLOP/s with a fixed cost o per layer and step (kernel launches, framework), a block costs
t_k = sum_{l in block k} (c_l / R + o), of which its F forward is f_k = sum (f_l / R + o / 2).
A message of b bytes costs m(b) = alpha + b / beta; rank k sends a_hi up (N x d floats) and b_lo
down (C x d, or N x d for an autoencoder).

The dependencies that set the period P of the steady state (``train.feedback_delay=1`` makes
K ranks compute what one process computes, so G's layer l+1 at step t+1 reads b of step t with
V_{l+1} *after* step t's update): rank k's step t needs a^(t) from rank k-1's forward of step t,
and b^(t) from rank k+1, which rank k+1 computes only once it has finished step t-1. Hence

- per-layer clipping (``optim.*.clip_mode=layer``, no step-wide barrier):
  P = max( max_k (t_k + its messages),  max_k (f_k + m(up) + t_{k+1} + m(down)) ),
  every rank's own work, and each neighbouring pair's cycle: k's forward, k+1's whole step;
- the default network-wide clip (one all-reduce of the gradient norms per step): no rank steps
  before the last has its gradients, so
  P = max( max_k (sum_{j<k} (f_j + m(up)) + t_k) + m(down),  max_k (t_k + its messages) )
  + alpha ceil(log2 K) (the all-reduce).
With K = 1 both are t_1. The best split is not the parameter-balanced one: rank k's forward and
rank k+1's whole step are in series, so the upper blocks should be the lighter ones.

Workers of one machine may not run at full speed side by side (shared memory bandwidth, one
physical core behind two virtual ones): ``kappa`` is the slowdown of one worker's matrix products
when K workers run them at once, measured here for K = 2.

Calibration and check (this machine, CPU): R and o from the single-process CCL step on 1 thread
(mlp_mnist and the narrower mlp_small, two equations); alpha and beta from a gloo ping-pong
between 2 processes; kappa from two 1-thread matmul loops at once. The prediction for 2 ranks is
compared with ``benchmarks/results/parallel_ccl.json`` (network clip) and
``parallel_ccl_layerclip.json`` (per-layer clip).

Prediction (GPU, not measured: no multi-GPU machine was lent): the same formulas with stated
assumptions for one H200 and NVLink (``--gpu-tflops``, ``--gpu-layer-us``, ``--link-us``,
``--link-gbps``), for K = 1, 2, 4, 8 on ``cnn`` (batch 128, the paper's CIFAR-10 CNN) and
``ae_conv`` (batch 32, the paper's STL-10 conv autoencoder), with the best contiguous split for
each K. On a lent GPU machine ``--device cuda`` (run by ``bash benchmarks/gpu.sh``) measures R
and o from GPU steps of ``cnn`` and ``mlp_mnist``, and alpha and beta by NCCL between GPUs 0 and
1, in place of the assumptions.

    python benchmarks/parallel_model.py [--device cpu|cuda] [--repeats 30] [--gpu-tflops 60]
        [--gpu-layer-us 60] [--link-us 15] [--link-gbps 150] [--out parallel_model.json]
writes benchmarks/results/parallel_model.json (parallel_model_cuda.json from gpu.sh)
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import torch
import torch.multiprocessing as mp

from speed_common import RESULTS, Stepper, environment, interleaved_times, median, write_json
from ccl_repr.parallel import layer_flops, split_points
from ccl_repr.models import DualNetwork

BATCHES = {"mlp_mnist": 256, "mlp_small": 64, "cnn": 128, "ae_conv": 32}


# ----------------------------------------------------------------------------- the model's inputs
def layer_costs(model: DualNetwork, batch: int) -> list[dict]:
    """Per layer: F's forward FLOPs on the batch (f), G's on G's batch (g; ccl_repr.parallel's
    count), the CCL and backprop step FLOPs, and the bytes of F's output (sent up: the batch) and
    of G's value at that boundary (sent down: the C prototypes, or the batch for an autoencoder)."""
    g_rows = batch if model.task == "reconstruct" else model.num_classes
    out = []
    for i, (layer, (f, g)) in enumerate(zip(model.layers, layer_flops(model, batch))):
        size = math.prod(model.shapes[i + 1]) * 4
        out.append({"layer": model.layer_names[i + 1], "f": f, "g": g, "ccl": 2 * (f + g),
                    "bp": 3 * f - (f if i == 0 else 0), "has_params": layer.has_params,
                    "up_bytes": batch * size, "down_bytes": g_rows * size})
    return out


def splits(model: DualNetwork, k: int) -> list[list[tuple[int, int]]]:
    """Every contiguous split into k blocks that ccl_repr.parallel accepts (starts after a layer
    with parameters)."""
    n = len(model.layers)
    return [list(zip([0, *c], [*c, n])) for c in itertools.combinations(split_points(model), k - 1)]


def step_time(layers: list[dict], blocks: list[tuple[int, int]], p: dict, *, clip: str) -> float:
    """Seconds per step (the period P) of the CCL pipeline over ``blocks``, for ``clip`` "layer"
    or "network" (formulas in the module docstring)."""
    k = len(blocks)
    rate = p["R"] / (p["kappa"] if k > 1 else 1.0)
    t = [sum(layers[i]["ccl"] / rate + p["o"] for i in range(lo, hi)) for lo, hi in blocks]
    if k == 1:
        return t[0]
    f = [sum(layers[i]["f"] / rate + p["o"] / 2 for i in range(lo, hi)) for lo, hi in blocks]
    up = [p["alpha"] + layers[hi - 1]["up_bytes"] / p["beta"] for lo, hi in blocks[:-1]]
    down = [p["alpha"] + layers[lo - 1]["down_bytes"] / p["beta"] for lo, hi in blocks[1:]]
    own = [tk + (up[j] if j < k - 1 else 0.0) + (down[j - 1] if j else 0.0) for j, tk in enumerate(t)]
    if clip == "network":
        chain = list(itertools.accumulate([0.0] + [fj + uj for fj, uj in zip(f, up)]))
        wave = max(c + tk for c, tk in zip(chain, t)) + max(down)
        return max(wave, *own) + p["alpha"] * math.ceil(math.log2(k))
    pair = [f[j] + up[j] + t[j + 1] + down[j] for j in range(k - 1)]
    return max(own + pair)


# ----------------------------------------------------------------------------- calibration (this CPU)
def calibrate_compute(repeats: int, device: torch.device, names: tuple[str, str]) -> dict:
    """R and o from CCL steps of two models (1 thread on CPU): time = FLOPs / R + layers x o."""
    torch.set_num_threads(1)
    rows = {}
    for name in names:
        st = Stepper(name, "ccl", device, batch=BATCHES[name])
        flops = sum(c["ccl"] for c in layer_costs(st.model, BATCHES[name]))
        times = interleaved_times({name: st.step}, device, repeats=repeats, warmup=5)[name]
        rows[name] = {"flops": flops, "layers": len(st.model.layers), "step_seconds": median(times)}
    (f1, n1, t1), (f2, n2, t2) = [(r["flops"], r["layers"], r["step_seconds"]) for r in rows.values()]
    # two equations t = f / R + n o
    inv_r = (t1 * n2 - t2 * n1) / (f1 * n2 - f2 * n1)
    o = (t1 - f1 * inv_r) / n1
    return {"R": 1.0 / inv_r, "o": max(o, 0.0), "steps": rows}


def _matmul_loop(seconds: float, out) -> None:
    torch.set_num_threads(1)
    a, b, n = torch.randn(512, 512), torch.randn(512, 512), 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    out.put(n / (time.perf_counter() - t0))


def measure_kappa(seconds: float = 3.0) -> dict:
    """Slowdown of a 1-thread matmul loop when 2 such processes run at once (1.0: two free cores)."""
    ctx = mp.get_context("spawn")
    rates = {}
    for k in (1, 2):
        q = ctx.SimpleQueue()
        procs = [ctx.Process(target=_matmul_loop, args=(seconds, q)) for _ in range(k)]
        for pr in procs:
            pr.start()
        rates[k] = [q.get() for _ in procs]
        for pr in procs:
            pr.join()
    return {"kappa": rates[1][0] / median(rates[2]), "matmuls_per_s": {str(k): v for k, v in rates.items()}}


def _pingpong(rank: int, port: int, sizes: list[int], repeats: int, backend: str, out) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    res = {}
    for n in sizes:
        buf, times = torch.zeros(n // 4, device=device), []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) / 2)
        res[n] = median(times[3:])
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def measure_link(backend: str = "gloo", sizes=(4, 40_960, 262_144, 1_048_576), repeats: int = 40) -> dict:
    """alpha (s) and beta (bytes/s) of a point-to-point message between 2 local processes (gloo on
    CPU; NCCL between GPUs 0 and 1)."""
    ctx = mp.get_context("spawn")
    q, port = ctx.SimpleQueue(), 29000 + os.getpid() % 1000
    procs = [ctx.Process(target=_pingpong, args=(r, port, list(sizes), repeats, backend, q)) for r in (0, 1)]
    for pr in procs:
        pr.start()
    res = q.get()
    for pr in procs:
        pr.join()
    small, large = min(sizes), max(sizes)
    beta = (large - small) / max(res[large] - res[small], 1e-9)
    return {"alpha": res[small], "beta": beta, "one_way_seconds": {str(k): v for k, v in res.items()}}


# ----------------------------------------------------------------------------- check and predict
def check_cpu(params: dict) -> dict:
    """Predicted vs measured 2-rank step of mlp_mnist (epoch seconds / steps per epoch), on the
    split those measurements used ([1], the default then: balanced by parameter count) and on the
    model's best split."""
    import json

    from ccl_repr.parallel import make_blocks
    model = Stepper("mlp_mnist", "ccl", torch.device("cpu"), batch=256).model
    layers = layer_costs(model, 256)
    steps = math.ceil(54000 / 256)  # mlp_mnist: 60k images, 10 % held out for validation
    used = make_blocks(model, 2, [1])
    out: dict = {"steps_per_epoch": steps, "split_measured": used,
                 "ccl_1_thread_predicted": step_time(layers, [(0, len(layers))], params, clip="layer")}
    for tag, clip in (("", "network"), ("_layerclip", "layer")):
        path = RESULTS / f"parallel_ccl{tag}.json"
        if not path.exists():
            continue
        measured = {k: v / steps for k, v in json.loads(path.read_text())["median_epoch_seconds"].items()}
        best = min(splits(model, 2), key=lambda b: step_time(layers, b, params, clip=clip))
        pred = step_time(layers, used, params, clip=clip)
        out[f"{clip}_clip"] = {"measured_step_seconds": measured, "source": path.name,
                               "predicted_parallel_on_measured_split": pred,
                               "predicted_over_measured": pred / measured["parallel_ccl"],
                               "best_split": best, "predicted_parallel_on_best_split": step_time(layers, best, params, clip=clip),
                               "every_split": {str(b[0][1]): step_time(layers, b, params, clip=clip)
                                               for b in splits(model, 2)}}
    return out


def predict_gpu(p: dict) -> dict:
    """Per model: speed-up over one GPU and ratio to backprop's step for K = 1, 2, 4, 8, each clip
    mode on its best split."""
    out = {"parameters": p}
    for name in ("cnn", "ae_conv"):
        model = Stepper(name, "ccl", torch.device("cpu"), batch=1).model
        layers = layer_costs(model, BATCHES[name])
        bp = sum(c["bp"] / p["R"] + p["o"] for c in layers)
        one = step_time(layers, [(0, len(layers))], p, clip="layer")
        rows = {}
        for k in (1, 2, 4, 8):
            if not splits(model, k):
                rows[str(k)] = {"note": f"{len(split_points(model)) + 1} blocks at most"}
                continue
            rows[str(k)] = {}
            for clip in ("layer", "network"):
                best = min(splits(model, k), key=lambda b: step_time(layers, b, p, clip=clip))
                t = step_time(layers, best, p, clip=clip)
                rows[str(k)][f"{clip}_clip"] = {"split": best, "step_seconds": t, "speedup_vs_1": one / t,
                                                "ratio_to_bp": t / bp}
        out[name] = {"batch": BATCHES[name], "layers": layers, "bp_step_seconds": bp, "ccl_step_seconds": one,
                     "k": rows}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--gpu-tflops", type=float, default=60.0, help="assumed effective FLOP/s of one GPU (TF32)")
    ap.add_argument("--gpu-layer-us", type=float, default=60.0, help="assumed fixed cost per layer and step (launches)")
    ap.add_argument("--link-us", type=float, default=15.0, help="assumed latency of one GPU-to-GPU message")
    ap.add_argument("--link-gbps", type=float, default=150.0, help="assumed GB/s of one GPU-to-GPU message")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: calibrate and check here, predict GPUs from the assumptions; cuda: measure them")
    ap.add_argument("--out", default="parallel_model.json", help="file name under benchmarks/results")
    args = ap.parse_args(argv)
    command = " ".join(["python", "benchmarks/parallel_model.py", *(argv if argv is not None else sys.argv[1:])])
    if args.device == "cuda":  # a lent GPU machine: the GPU parameters are measured, not assumed
        compute = calibrate_compute(args.repeats, torch.device("cuda"), ("cnn", "mlp_mnist"))
        link = measure_link("nccl") if torch.cuda.device_count() > 1 else {}
        gpu = {"R": compute["R"], "o": compute["o"], "alpha": link.get("alpha", args.link_us * 1e-6),
               "beta": link.get("beta", args.link_gbps * 1e9), "kappa": 1.0, "measured": ["R", "o", *link]}
        record = {"calibration_steps": compute["steps"], "gpu_prediction": predict_gpu(gpu)}
    else:
        compute = calibrate_compute(args.repeats, torch.device("cpu"), ("mlp_mnist", "mlp_small"))
        params = {**{k: compute[k] for k in ("R", "o")}, **measure_kappa(), **measure_link()}
        gpu = {"R": args.gpu_tflops * 1e12, "o": args.gpu_layer_us * 1e-6, "alpha": args.link_us * 1e-6,
               "beta": args.link_gbps * 1e9, "kappa": 1.0, "measured": []}
        record = {"cpu_parameters": params, "calibration_steps": compute["steps"], "cpu_check": check_cpu(params),
                  "gpu_prediction": predict_gpu(gpu)}
    record = {"benchmark": "parallel_model", "env": environment(torch.device(args.device), 1), "command": command,
              **record}
    write_json(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
