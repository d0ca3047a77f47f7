"""Check that a training step never waits for the host (CUDA only; on CPU there is nothing to check).

Runs the train loop's per-step work - a shuffled batch gathered on the device, the method's
backward, clip + SGD for both networks, loss sums kept on the device - for every method and both
CCL modes under ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first operation
that synchronises with the host. The once-per-epoch reads (loss means, validation) are outside.
Then the real ``train()`` runs 3 epochs under mode "warn" and the synchronisations it makes are
counted: they must be a handful per epoch (loss read, validation, checkpoint), not one per step.

    python benchmarks/speed_sync.py [--steps 50]
writes benchmarks/results/speed_sync_{cpu,cuda}.json
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from speed_common import environment, setup, write_json
from ccl_repr.config import DataConfig, make_config
from ccl_repr.data import augment, batches, load_data, shuffle_order
from ccl_repr.fastpath import apply as apply_fast_path
from ccl_repr.builder import build_trainable
from ccl_repr.train import train


def check(recipe: str, method: str, sets: list[str], device: torch.device, steps: int) -> str:
    cfg = make_config(recipe, method=method, sets=sets)
    bundle = load_data(DataConfig(name="digits"), device=device)
    # the recipe's model on digits-sized data is enough: syncs do not depend on sizes
    model, m, optim = build_trainable(cfg, input_shape=bundle.input_shape, num_classes=bundle.num_classes,
                                      total_steps=10 ** 6, device=device)
    apply_fast_path(model, m, cfg.train, device, bundle)
    gen = torch.Generator(device=device).manual_seed(0)
    aug = torch.Generator(device=device).manual_seed(1)
    sums: dict = {}
    done = 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        while done < steps:
            for x, y in batches(bundle.train, 64, order=shuffle_order(bundle.train, gen), augment_with=aug):
                optim.zero_grad()
                losses = m.backward(model, x, y)
                optim.clip_and_step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v
                done += 1
                if done == steps:
                    break
        return "ok: no host synchronisation"
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def count_train_syncs(epochs: int) -> dict:
    cfg = make_config("mlp_digits", method="ccl", sets=[f"train.epochs={epochs}", "train.progress=false"])
    steps = epochs * -(-round(1437 * 0.9) // cfg.train.batch_size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, Path(tmp) / "run", log=lambda m: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"epochs": epochs, "steps": steps, "syncs": syncs, "syncs_per_step": syncs / steps,
            "per_epoch": syncs / epochs}


def verdict(results: dict[str, str]) -> tuple[bool | None, str]:
    """("met", status) of the checks: met only when every check ran and none synchronised; None
    (not measured) when nothing was checked, e.g. on CPU, so an empty run never reads as met."""
    if not results:
        return None, "not measured: no CUDA device, nothing to check"
    met = all(v.startswith("ok") for v in results.values())
    return met, "met" if met else "not met"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    device = setup(2)
    results: dict = {}
    counted = None
    if device.type == "cuda":
        for name, (recipe, method, sets) in {
            "ccl_mlp": ("mlp_digits", "ccl", []),
            "ccl_mlp_layerwise": ("mlp_digits", "ccl", ["train.layerwise=true"]),
            "bp_mlp": ("mlp_digits", "bp", []),
            "ccl_mlp_fp32": ("mlp_digits", "ccl", ["train.amp=off"]),
        }.items():
            results[name] = check(recipe, method, sets, device, args.steps)
            print(f"{name:20s} {results[name]}", flush=True)
        # on-device augmentation (random crop + flip) must not sync either
        x = torch.randn(64, 3, 32, 32, device=device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            augment(x, torch.Generator(device=device).manual_seed(0))
            results["augment"] = "ok: no host synchronisation"
        except RuntimeError as e:
            results["augment"] = f"SYNC: {str(e).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"{'augment':20s} {results['augment']}")
        counted = count_train_syncs(3)
        print(f"train() 3 epochs: {counted['syncs']} syncs in {counted['steps']} steps "
              f"({counted['per_epoch']:.1f} per epoch)")
    else:
        print("CPU: host and device are the same; nothing to check")
    met, status = verdict(results)
    print(f"verdict: {status}")
    write_json(f"speed_sync_{device.type}.json", {"benchmark": "speed_sync", "env": environment(device, 2),
                                                  "steps": args.steps, "results": results,
                                                  "train_loop": counted,
                                                  "met": met, "status": status})


if __name__ == "__main__":
    main()
