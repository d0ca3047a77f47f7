"""Seconds to load an image folder the first time (parallel decode, cache written) and again (cache).

Each load is the real ``load_data`` of ``data.name=imagefolder`` (listing, fingerprint, decode or
cache read, float conversion, validation split, standardisation), into a fresh cache folder that
is removed at the end. Wall and process CPU seconds are both recorded: on a shared machine the
wall time depends on the load average, recorded too.

    python benchmarks/imagefolder_load.py --root data/cifar10 [--threads 0] [--tag _cifar10]
writes benchmarks/results/imagefolder_load{tag}.json
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from speed_common import write_json

from ccl_repr.config import DataConfig
from ccl_repr.data import load_data


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_load(cfg: DataConfig) -> tuple[dict, object]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    bundle = load_data(cfg, progress=False)
    return {"wall_seconds": round(time.perf_counter() - wall, 3), "cpu_seconds": round(cpu_seconds() - cpu, 3),
            "load_average_1min": round(os.getloadavg()[0], 2)}, bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="image folder (ROOT/train/<class>/…, ROOT/test/<class>/…)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the float conversion; 0 = default")
    p.add_argument("--tag", default="", help="suffix of the JSON name")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="ccl-imagefolder-bench-"))
    try:
        cfg = DataConfig(name="imagefolder", root=args.root, cache_dir=str(cache))
        first, bundle = timed_load(cfg)
        second, _ = timed_load(cfg)
        cache_bytes = sum(f.stat().st_size for f in cache.iterdir())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    result = {"root": str(args.root), "first_load": first, "cached_load": second, "cache_bytes": cache_bytes,
              "input_shape": list(bundle.input_shape), "classes": bundle.classes,
              "num_train": len(bundle.train), "num_val": len(bundle.val), "num_test": len(bundle.test),
              "decode_threads": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}
    print(f"first load {first['wall_seconds']} s wall ({first['cpu_seconds']} s CPU), "
          f"cached {second['wall_seconds']} s wall ({second['cpu_seconds']} s CPU)")
    write_json(f"imagefolder_load{args.tag}.json", result)


if __name__ == "__main__":
    main()
