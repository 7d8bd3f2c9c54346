"""The report of a run: report.json, report.md and matplotlib plots in RUN/report/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vqdiff.checkpoint import atomic_write, write_json


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def setting(r: dict[str, Any]) -> str:
    s = r["generator"] + (f" {r['sampler']}" if r.get("sampler") else "") + f" t={r['temperature']:g}"
    s += f" s={r['steps']}" if r.get("steps") else ""
    return s + (f" on {r['sample_schedule']}" if r.get("sample_schedule") else "")


def best_sentence(results: list[dict[str, Any]]) -> list[str]:
    """One sentence naming the best diffusion setting by FID (with its recall) against AR's best."""
    diff = [r for r in results if r["generator"] == "diffusion"]
    ar = [r for r in results if r["generator"] == "ar"]
    if not diff:
        return []
    d = min(diff, key=lambda r: r["fid"])
    text = f"**Best diffusion setting: {setting(d)}**, FID {_fmt(d['fid'])} (recall {_fmt(d.get('recall'), 3)})"
    if ar:
        a = min(ar, key=lambda r: r["fid"])
        text += f", against the best AR setting {setting(a)}: FID {_fmt(a['fid'])} (recall {_fmt(a.get('recall'), 3)})"
    return [text + ".", ""]


def results_table(report: dict[str, Any]):
    """The results as a rich table, for the terminal: one row a setting, then the context rows."""
    from rich.table import Table

    tok = report["tokenizer"]
    title = (
        f"{report['recipe']}: {report['num_samples']} samples per setting, extractor {report['extractor']} "
        f"({report['extractor_hash']})"
    )
    table = Table(title=title, title_justify="left")
    for col in ("setting", "FID", "KID", "precision", "recall", "images/s", "passes"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in report["results"]:
        kid = f"{r['kid']:.3f}" if r.get("kid") is not None else "-"
        table.add_row(
            setting(r), f"{r['fid']:.2f}", kid, f"{r['precision']:.3f}" if r.get("precision") is not None else "-",
            f"{r['recall']:.3f}" if r.get("recall") is not None else "-", f"{r['images_per_second']:.1f}",
            str(r["forward_passes"]),
        )  # fmt: skip
    table.add_row("tokenizer rFID", f"{tok['rfid']:.2f}", "", "", "", "", "", style="dim")
    table.add_row("data floor (train vs test)", f"{report['floor_fid']:.2f}", "", "", "", "", "", style="dim")
    return table


def write_plots(report: dict[str, Any], report_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    plots = {}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # FID against steps: one line per (sampler, temperature) for diffusion; AR (no steps) as dashed levels
    fig, ax = plt.subplots(figsize=(6, 4))
    temps = sorted({r["temperature"] for r in results})
    samplers = sorted({r.get("sampler") for r in results if r["generator"] == "diffusion"}, key=str)
    styles = ["o-", "s-", "^-", "D-"]
    for i, t in enumerate(temps):
        c = colours[i % len(colours)]
        for j, sm in enumerate(samplers):
            diff = sorted(
                (r for r in results if r["generator"] == "diffusion" and r["temperature"] == t and r.get("sampler") == sm),
                key=lambda r: r["steps"],
            )
            if diff:
                label = "diffusion" + (f" {sm}" if sm else "") + f" t={t:g}"
                ax.plot([r["steps"] for r in diff], [r["fid"] for r in diff], styles[j % len(styles)], color=c, label=label)
        for r in results:
            if r["generator"] == "ar" and r["temperature"] == t:
                ax.axhline(r["fid"], color=c, ls="--", label=f"ar t={t:g} ({r['forward_passes']} passes)")
    ax.axhline(report["floor_fid"], color="grey", ls=":", label="data floor (train vs test)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("diffusion sampling steps (forward passes)")
    plots["fid_vs_steps"] = _save(fig, ax, report, report_dir, "FID against steps", "fid_vs_steps.png")

    # FID against speed: every setting
    fig, ax = plt.subplots(figsize=(6, 4))
    for gi, g in enumerate(("ar", "diffusion")):
        rs = [r for r in results if r["generator"] == g]
        if not rs:
            continue
        ax.scatter([r["images_per_second"] for r in rs], [r["fid"] for r in rs], color=colours[gi], label=g)
        for r in rs:
            ax.annotate(setting(r).split(" ", 1)[1], (r["images_per_second"], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s ({report['device']}, generation + decoding)")
    plots["fid_vs_speed"] = _save(fig, ax, report, report_dir, "FID against speed", "fid_vs_speed.png")
    return plots


def plot_curve(curve: dict[str, Any], report_dir: Path, *, dataset: str) -> str:
    """Learning curves: FID against training steps and against training wall time, one line per
    generator, recall as a dotted line on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bits = any("test_bits_per_token" in p for p in curve["points"])
    fig, axes = plt.subplots(1, 3 if bits else 2, figsize=(15 if bits else 10, 4))
    if bits:  # held-out against train bits per token: where each generator starts to overfit
        for i, g in enumerate(("ar", "diffusion")):
            pts = sorted((p for p in curve["points"] if p["generator"] == g), key=lambda p: p["step"])
            for split, style in (("test", "o-"), ("train", "x--")):
                axes[2].plot([p["train_seconds"] for p in pts], [p[f"{split}_bits_per_token"] for p in pts], style, color=colours[i], label=f"{g} {split}")
        axes[2].set_xlabel("training wall time (s)")
        axes[2].set_ylabel("bits per token (AR exact, diffusion ELBO)")
        axes[2].legend(fontsize=8)
    for ax, x, xlabel in zip(axes, ("step", "train_seconds"), ("training steps", "training wall time (s)")):
        twin = ax.twinx()
        for i, g in enumerate(("ar", "diffusion")):
            pts = sorted((p for p in curve["points"] if p["generator"] == g), key=lambda p: p["step"])
            if pts:
                ax.plot([p[x] for p in pts], [p["fid"] for p in pts], "o-", color=colours[i], label=f"{g} FID")
                twin.plot([p[x] for p in pts], [p["recall"] for p in pts], ":", color=colours[i], label=f"{g} recall")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"FID ({curve['extractor']})")
        twin.set_ylabel("recall")
        twin.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="upper left")
        twin.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"{dataset}: learning curves ({curve['num_samples']} samples; diffusion {curve['diffusion_sampler']}, "
        f"{curve['diffusion_steps']} steps)"
    )
    fig.tight_layout()
    fig.savefig(report_dir / "learning_curve.png", dpi=120)
    plt.close(fig)
    return "learning_curve.png"


def _save(fig, ax, report: dict[str, Any], report_dir: Path, title: str, name: str) -> str:
    """The FID axis, title and legend every plot shares; write the PNG and return its name."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(f"FID ({report['extractor']})")
    ax.set_title(f"{report['dataset']}: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report_dir / name, dpi=120)
    plt.close(fig)
    return name


def markdown(report: dict[str, Any], report_dir: Path) -> str:
    run = Path(report["run"])

    def rel(path_in_run: str) -> str:
        return os.path.relpath(run / path_in_run, report_dir)

    tok = report["tokenizer"]
    lines = [
        f"# vqdiff report: {report['recipe']} ({report['dataset']})",
        "",
        *best_sentence(report["results"]),
        f"- Feature extractor: **{report['extractor']}** (hash `{report['extractor_hash']}`)"
        + (f", test accuracy {report['extractor_info']['test_accuracy']:.4f}" if "test_accuracy" in report.get("extractor_info", {}) else ""),
        f"- Samples per setting: {report['num_samples']}, against the reference set: {report['reference']} "
        "(FID depends on the reference set and its size)",
        f"- Data floor (train vs test, same count): FID **{_fmt(report['floor_fid'])}**",
        f"- Tokenizer: rFID **{_fmt(tok['rfid'])}**, PSNR {_fmt(tok['psnr'])} dB, codebook usage {_fmt(tok['codebook_usage'], 3)}",
    ]
    for g, b in report.get("bits_per_token", {}).items():
        what = "exact" if b.get("kind") == "exact" else "ELBO upper bound"
        lines.append(f"- {g}: {_fmt(b.get('bits_per_token'), 3)} bits per token on the test split ({what})")
    lines += [
        f"- Device: {report['device']}; classifier-free guidance scale {report['cfg']:g}; "
        f"top-k {report.get('top_k') or 'off'}; top-p {report.get('top_p') or 'off'}"
        + "".join(f"; {k} {v}" for k, v in report.get("software", {}).items()),
        "",
        "| generator | sampler | temperature | steps | forward passes | FID | KID | precision | recall | IS | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        kid = r.get("kid")
        lines.append(
            f"| {r['generator']} | {r.get('sampler') or '–'} | {r['temperature']:g} | {r['steps'] or '–'} | {r['forward_passes']} | {_fmt(r['fid'])} | "
            f"{_fmt(kid, 3)} | {_fmt(r['precision'], 3)} | {_fmt(r['recall'], 3)} | {_fmt(r.get('isc'))} | "
            f"{_fmt(r['images_per_second'], 1)} |"
        )
    if report.get("isc_omitted"):
        lines += ["", f"IS column empty: {report['isc_omitted']}."]
    lines += ["", "## Plots", "", "![FID against steps](fid_vs_steps.png)", "", "![FID against speed](fid_vs_speed.png)", ""]
    if (report_dir / "learning_curve.png").exists():
        lines += ["## Learning curves", "", "![learning curves](learning_curve.png)", ""]
    lines += ["## Samples", ""]
    shown = set()
    for r in report["results"]:
        if r["generator"] in shown:
            continue
        shown.add(r["generator"])
        lines += [f"**{setting(r)}**", "", f"![{setting(r)}]({rel(r['samples'] + '/grid.png')})", ""]
    if report.get("trajectory_gif"):
        lines += ["## Diffusion refining an image", "", f"![trajectory]({rel(report['trajectory_gif'])})", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, report_dir)
    write_json(report_dir / "report.json", report)
    text = markdown(report, report_dir)
    atomic_write(report_dir / "report.md", lambda tmp: Path(tmp).write_text(text))
