"""eval.json and a short Markdown report (report.md) that embeds the PNGs.

``eval.json`` holds, per evaluated layer of the forward network (``layers``) and, for
autoencoders, of the feedback network (``feedback_layers``): ``linear_probe_accuracy``,
``knn_accuracy`` (top-1), ``knn_top5``, the full protocol records, and the baselines beside it
(pixels, PCA of the same width, random init). Plus ``baselines``, ``umap``, ``cka``,
``alignment`` and ``run_summary`` where those were computed, ``class_names`` (label order),
``settings`` (every protocol's settings as used) and ``timings`` (seconds per protocol). The
report names classes by ``class_names`` (the per-class probe accuracy of the feature layer).
Both files are written atomically.
"""

from __future__ import annotations

from pathlib import Path

from ccl_repr import checkpoint as ckpt

EVAL_JSON, REPORT_MD = "eval.json", "report.md"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _layer_table(layers: dict, title: str) -> list[str]:
    if not layers:
        return []
    lines = [f"### {title}", "",
             "| layer | dim | linear probe % | kNN top-1 % | kNN top-5 % | pixels (probe / kNN) | PCA same dim "
             "(probe / kNN) | random init (probe / kNN) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in layers.items():
        b = r.get("baselines", {})

        def pair(key: str) -> str:
            x = b.get(key)
            return "–" if not x else f"{_pct(x.get('linear_probe_accuracy'))} / {_pct(x.get('knn_accuracy'))}"

        lines.append(f"| {name} | {r['dim']} | {_pct(r.get('linear_probe_accuracy'))} | "
                     f"{_pct(r.get('knn_accuracy'))} | {_pct(r.get('knn_top5'))} | {pair('pixels')} | "
                     f"{pair('pca')} | {pair('random_init')} |")
    return lines + [""]


def _per_class_table(result: dict) -> list[str]:
    """Linear-probe test accuracy per class (by name) of the feature layer, if it was probed."""
    layer = result.get("layers", {}).get(result.get("feature_layer"), {})
    acc = layer.get("linear_probe", {}).get("per_class_accuracy")
    if not acc:
        return []
    names = result.get("class_names") or [str(i) for i in range(len(acc))]
    names = names + [str(i) for i in range(len(names), len(acc))]
    lines = [f"### Linear probe per class, layer {result['feature_layer']}", "", "| class | test accuracy % |",
             "|---|---:|"]
    lines += [f"| {names[c]} | {_pct(a)} |" for c, a in enumerate(acc)]
    return lines + [""]


def markdown(result: dict) -> str:
    s = result.get("run_summary", {})
    lines = [f"# Evaluation of `{result['run_dir']}`", "",
             f"Model `{result['model']}` ({result['task']}), dataset `{result['dataset']}`, method "
             f"`{result['method']}`, {result['weights']} weights; feature layer `{result['feature_layer']}`."]
    if "test_accuracy" in s:
        lines.append(f"Run: test accuracy {_pct(s['test_accuracy'])} % at best epoch {s.get('best_epoch')}.")
    elif "test_mse" in s:
        lines.append(f"Run: test reconstruction MSE {s['test_mse']:.5f} at best epoch {s.get('best_epoch')}.")
    lines += ["", "## Linear probe and kNN per layer", ""]
    lines += _layer_table(result.get("layers", {}), "Forward network F")
    lines += _layer_table(result.get("feedback_layers", {}), "Feedback network G (fed the images)")
    first = next(iter(result.get("layers", {}).values()), None)
    if first:
        lp, kn = first.get("linear_probe", {}).get("protocol"), first.get("knn", {}).get("protocol")
        if lp:
            lines.append(f"Linear probe: standardised features, logistic regression, C from {lp['Cs']} chosen "
                         f"on {lp['num_val']} validation samples; {lp['num_train']} train, {lp['num_test']} test.")
        if kn:
            lines.append(f"kNN: cosine similarity, k={kn['k']}, votes exp(sim/{kn['temperature']}).")
        lines.append("")
    lines += _per_class_table(result)
    for u in result.get("umap", []):
        p = u["params"]
        lines += [f"## UMAP of layer {u['layer']}", "", f"![UMAP {u['layer']}]({u['png']})", "",
                  f"{u['num_points']} test points + {u['num_feedback_points']} feedback points "
                  f"({u['feedback_kind']}) in one fit; n_neighbors {p['n_neighbors']}, min_dist {p['min_dist']}, "
                  f"metric {p['metric']}, seed {p['seed']} (parameters in {Path(u['png']).stem}.json; 2-D "
                  f"coordinates with labels and class names in {u.get('coords_csv', '–')} and "
                  f"{u.get('coords_npz', '–')}).", ""]
    if "cka" in result:
        c = result["cka"]
        lines += ["## CKA between forward and feedback layers", "", f"![CKA]({c['png']})", "",
                  f"Linear CKA on {c['protocol']['max_samples']} test samples (at most); rows: forward layers "
                  f"a_l, columns: feedback layers b_m; one panel per checkpoint. Numbers in cka.json.", ""]
    if "alignment" in result:
        a = result["alignment"]
        rule = a.get("rule", result.get("method", "CCL"))
        align, align0 = a.get("weight_alignment") or {}, a.get("weight_alignment_random_init") or {}
        lines += ["## Weight alignment and update angle", "",
                  f"| layer | cos(U, W) | at random init | angle({rule} update, backprop) ° | at random init ° |",
                  "|---|---:|---:|---:|---:|"]
        for name, v in a["update_angle_degrees"].items():
            lines.append(f"| {name} | {_num(align.get(name), 3)} | {_num(align0.get(name), 3)} | {_num(v, 1)} | "
                         f"{_num(a['update_angle_degrees_random_init'].get(name), 1)} |")
        weight = a.get("protocol", {}).get("feedback_weight", "W = V^T")
        lines += ["", f"Weight alignment: {weight}. An angle is – where one of the two gradients is zero "
                  "(backprop at an init whose outermost weights are zero).", ""]
    t = result.get("timings", {})
    split = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
    lines.append(f"Evaluation took {result.get('seconds', 0):.1f} s{f' ({split} s)' if split else ''}. "
                 f"Full numbers, settings and protocols: `{EVAL_JSON}`.")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: Path | str) -> tuple[Path, Path]:
    out = Path(out_dir)
    ckpt.write_json(out / EVAL_JSON, result)
    ckpt.atomic_write_bytes(out / REPORT_MD, markdown(result).encode())
    return out / EVAL_JSON, out / REPORT_MD
