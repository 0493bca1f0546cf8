"""`bench perf`'s report as plain text."""

from __future__ import annotations


def render(r: dict) -> str:
    """The report as a few short tables of plain text."""
    lines = [
        f"bench perf on {r['device_name']} (torch {r['torch']}, torchattacks {r['torchattacks']}), "
        f"fast path {r['fast_path']}"
    ]
    rc = r["race"]
    lines += [
        "",
        f"PGD race: {rc['images']} digits images x {rc['steps']} steps, eps {rc['eps']:g}, "
        f"step {rc['step_size']:g}, random start; model {rc['model']['defense']} "
        f"(clean {rc['model']['clean_acc']:.3f})",
        f"  {'':27} {'seconds':>9} {'img*steps/s':>12} {'robust acc':>10}",
    ]
    for k in rc["seconds"]:
        lines.append(
            f"  {k:27} {rc['seconds'][k]:9.3f} {rc['images_steps_per_s'][k]:12.0f} {rc['robust_acc'][k]:10.4f}"
        )
    lines.append(
        f"  ratio (torchattacks time / ours): {rc['ratio_equal_work']:.2f} at equal work, "
        f"{rc['ratio_early_stop']:.2f} with early stop"
        + (
            f"; {rc['ratio_equal_work_unrewritten']:.2f} at equal work without the exact graph rewrites"
            if rc.get("ratio_equal_work_unrewritten")
            else ""
        )
    )
    sc = r["scaling"]
    lines += ["", "Scaling (ours, early stop off):"]
    for key, unit in (("images", "images"), ("steps", "steps")):
        rows = sc[key]
        fit = sc[f"fit_{key}"]
        lines.append("  " + "  ".join(f"{row[unit]} {unit}: {row['seconds']:.3f}s" for row in rows))
        lines.append(
            f"  fit t = {fit['intercept_s']:.4f} + {fit['slope_s']:.6f} * {unit}  (R^2 {fit['r2']:.4f}); "
            f"time ratios {', '.join(f'{t:.2f}' for t in fit['time_ratios'])} for size ratios "
            f"{', '.join(f'{s:g}' for s in fit['size_ratios'])}"
        )
    m = r["matrix"]
    lines += [
        "",
        f"Matrix {m['matrix']} on {m['defense']}: {m['cells']} cells, train {m['train_seconds'] or 0:.1f} s, "
        f"attacks {m['attack_seconds']:.1f} s, wall {m['wall_seconds']:.1f} s"
        + (f"; stopped by an error: {m['error']}" if m["error"] else ""),
    ]
    pm = r["precision"].get("matrix")
    if pm:
        lines.append(f"  the same cells crafted in fp32: largest robust-accuracy difference {pm['max_abs_difference']}")
    p = r["precision"]
    lines += [
        "",
        f"Precision: bench default {p['bench_default']}, recommended {p['recommended']}"
        + (
            f", bf16 agrees with fp32 within {p['tolerance'] * 100:g} points: {p['bf16_agrees']}"
            if "cells" in p
            else f" ({p.get('note', '')})"
        ),
    ]
    if "overall" in p:
        o = p["overall"]
        lines.append(
            f"  every PGD comparison (digits and ResNet-18): bf16 agrees {o['bf16_agrees']}, "
            f"recommended {o['recommended']}, bench default {o['bench_default']}"
        )
    for key, row in p.get("cells", {}).items():
        lines.append(
            f"  {key}: fp32 {row['fp32']['robust_acc']:.4f} ({row['fp32']['seconds']:.2f}s)  "
            f"bf16 {row['bf16']['robust_acc']:.4f} ({row['bf16']['seconds']:.2f}s)"
        )
    g = r.get("gpu")
    if g:
        lines += [
            "",
            f"GPU: bf16 matmul {g['matmul_bf16_tflops']:.0f} TFLOP/s measured, {g['datasheet_bf16_tflops']} datasheet",
        ]
        for run in g["train"]["runs"]:
            lines.append(
                f"  train {g['train']['recipe']}, batch {run['batch_size']}: "
                f"{run['seconds_per_epoch']:.2f} s/epoch on {run['images']} images "
                f"(epochs {', '.join(f'{s:.2f}' for s in run['epoch_seconds'])})"
            )
        for arch, res in g["models"].items():
            fl = res["flops_per_image"]
            lines.append(
                f"  {arch} ({res['weights']}): {fl['forward'] / 1e9:.2f} GFLOP forward, "
                f"{fl['pgd_step'] / 1e9:.2f} GFLOP per PGD step, per image"
            )
            for label, row in res["variants"].items():
                extra = (
                    f", {row['achieved_tflops']:.0f} TFLOP/s = {row['fraction_of_measured_peak']:.0%} of measured peak"
                    if "achieved_tflops" in row
                    else ""
                )
                lines.append(
                    f"    PGD-{res['steps']} x {res['images']} {label}: {row['seconds']:.2f} s "
                    f"(first call {row['first_call_seconds']:.1f} s){extra}, robust acc {row['robust_acc']:.4f}"
                )
            if "race" in res:
                rr = res["race"]
                lines.append(
                    f"    vs torchattacks (fp32): {rr['ratio_equal_work']:.2f}x at equal work, "
                    f"{rr['ratio_early_stop']:.2f}x with early stop"
                )
            if "precision" in res:
                for key, row in res["precision"]["cells"].items():
                    lines.append(
                        f"    precision {key}: fp32 {row['fp32']['robust_acc']:.4f}  bf16 {row['bf16']['robust_acc']:.4f}"
                    )
    return "\n".join(lines)
