"""The report of a run: report.json, report.md and matplotlib plots in RUN/report/.

FID in more than one feature space: `fid` (and `floor_fid`, `tokenizer.rfid`) is the configured
extractor's; where the other one can run too (the dataset classifier needs labels, Inception its
weights here), every row has `fids` = {extractor name: FID}, the configured one first, as do
`floor_fids` and `tokenizer.rfids`; `spaces` lists them ([{extractor, hash, mode, primary}]).
`class_accuracy` (per row; None: unconditional) is the share of samples the dataset classifier
assigns to the class they were conditioned on, next to `classifier_test_accuracy`, its accuracy on
the real test images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vqdiff.io import atomic_write, write_json
from vqdiff.options import NAMED_WHEN_SET


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def setting(r: dict[str, Any]) -> str:
    s = r["generator"] + (f" {r['sampler']}" if r.get("sampler") else "") + f" t={r['temperature']:g}"
    s += f" s={r['steps']}" if r.get("steps") else ""
    s += f" ct={r['choice_temperature']:g}" if r.get("choice_temperature") is not None else ""  # maskgit's, when not 4.5
    return s + "".join(LABELS[k].format(r[k]) for k in NAMED_WHEN_SET if r.get(k))  # e.g. " on cosine": a sample schedule


# how a setting's name shows each option of vqdiff.options.NAMED_WHEN_SET that is set
LABELS = {"sample_schedule": " on {}", "cfg_schedule": " cfg {}"}


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


def reference_note(num: int, reference_size: int) -> str:
    """Why these FIDs are not the ones papers report: the sample count and the reference set differ."""
    return (
        f"FID here is {num} samples against {reference_size} test images. It is not FID-50k (50,000 samples against "
        "the train split's statistics, the number papers report) and cannot be compared with it: FID falls as the "
        "sample count grows and moves with the reference set"
    )


def spaces_sentence(results: list[dict[str, Any]]) -> list[str]:
    """With FID in two feature spaces and two generators: whether the spaces agree on which generator
    is better, each judged by its best row in that space."""
    spaces = list(results[0].get("fids") or {}) if results else []
    generators = sorted({r["generator"] for r in results})
    if len(spaces) < 2 or len(generators) < 2 or any(set(r.get("fids") or {}) != set(spaces) for r in results):
        return []
    verdicts = []
    for space in spaces:
        best = {g: min((r for r in results if r["generator"] == g), key=lambda r: r["fids"][space]) for g in generators}
        ranked = sorted(generators, key=lambda g: best[g]["fids"][space])
        sides = ", ".join(f"{setting(best[g])} {_fmt(best[g]['fids'][space])}" for g in ranked)
        verdicts.append((ranked[0], f"by {space} FID {ranked[0]} is better ({sides})"))
    if len({w for w, _ in verdicts}) > 1:
        text = "**The feature spaces disagree on which generator is better**: " + "; ".join(v for _, v in verdicts)
    else:
        text = f"Both feature spaces ({', '.join(spaces)}) agree that {verdicts[0][0]} is better: " + "; ".join(v for _, v in verdicts)
    return [text + ".", ""]


def other_spaces(report: dict[str, Any]) -> list[str]:
    """The feature spaces besides the configured one (empty for a report of one space)."""
    return [sp["extractor"] for sp in report.get("spaces", []) if not sp.get("primary")]


def _conditional(report: dict[str, Any]) -> bool:
    return any(r.get("class_accuracy") is not None for r in report["results"])


def results_table(report: dict[str, Any]):
    """The results as a rich table, for the terminal: one row a setting, then the context rows."""
    from rich.table import Table

    tok, others, conditional = report["tokenizer"], other_spaces(report), _conditional(report)
    title = (
        f"{report['recipe']}: {report['num_samples']} samples per setting, extractor {report['extractor']} "
        f"({report['extractor_hash']})"
    )
    table = Table(title=title, title_justify="left")
    columns = ["setting", "FID", *(f"FID {o}" for o in others), "KID", "precision", "recall"]
    columns += ["class acc."] * conditional + ["images/s", "passes"]
    for col in columns:
        table.add_column(col, justify="left" if col == "setting" else "right")
    for r in report["results"]:
        acc = [_fmt(r.get("class_accuracy"), 3)] * conditional
        table.add_row(
            setting(r), _fmt(r["fid"]), *(_fmt(r["fids"].get(o)) for o in others), _fmt(r.get("kid"), 3),
            _fmt(r.get("precision"), 3), _fmt(r.get("recall"), 3), *acc, f"{r['images_per_second']:.1f}", str(r["forward_passes"]),
        )  # fmt: skip
    blank = [""] * (len(columns) - 2 - len(others))
    rfids, floors = tok.get("rfids") or {}, report.get("floor_fids") or {}
    table.add_row("tokenizer rFID", f"{tok['rfid']:.2f}", *(_fmt(rfids.get(o)) for o in others), *blank, style="dim")
    table.add_row("data floor (train vs test)", f"{report['floor_fid']:.2f}", *(_fmt(floors.get(o)) for o in others), *blank, style="dim")
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


def plot_curve(curve: dict[str, Any], report_dir: Path, *, name: str) -> str:
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
        f"{name}: learning curves ({curve['num_samples']} samples; diffusion {curve['diffusion_sampler']}, "
        f"{curve['diffusion_steps']} steps; CFG {_guidance(curve['cfg'], curve['points'])})"
    )
    fig.tight_layout()
    fig.savefig(report_dir / "learning_curve.png", dpi=120)
    plt.close(fig)
    return "learning_curve.png"


def plot_decoder_curve(curve: dict[str, Any], report_dir: Path, *, name: str) -> str:
    """The decoder refinement: rFID in each feature space (left axis) and PSNR (right) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve["points"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for space in curve["spaces"]:
        ax.plot([p["step"] for p in pts], [p["rfids"][space] for p in pts], "o-", label=f"rFID ({space})")
    twin = ax.twinx()
    twin.plot([p["step"] for p in pts], [p["psnr"] for p in pts], "s:", color="grey", label="PSNR")
    ax.set_xlabel("refinement steps (0: the tokenizer's own decoder)")
    ax.set_ylabel("rFID")
    twin.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=8, loc="upper left")
    twin.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{name}: decoder refinement ({curve['num_images']} test reconstructions)")
    fig.tight_layout()
    fig.savefig(report_dir / "decoder_curve.png", dpi=120)
    plt.close(fig)
    return "decoder_curve.png"


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


def _in_other_spaces(fids: dict[str, float] | None, others: list[str]) -> str:
    """" (classifier 4.12)": the same FID in the other feature spaces, or nothing."""
    values = [f"{o} {_fmt((fids or {}).get(o))}" for o in others]
    return f" ({'; '.join(values)})" if values else ""


def _measurement_lines(report: dict[str, Any]) -> list[str]:
    """The bullets that say what was measured, against what, and what it can be compared with."""
    tok, others = report["tokenizer"], other_spaces(report)
    info = report.get("extractor_info", {})
    lines = [
        f"- Feature extractor: **{report['extractor']}** (hash `{report['extractor_hash']}`"
        + (f", {report['extractor_mode']}" if report.get("extractor_mode", "fp32") != "fp32" else "") + ")"
        + (f", test accuracy {info['test_accuracy']:.4f}" if "test_accuracy" in info else ""),
    ]
    for sp in report.get("spaces", []):
        if not sp.get("primary"):
            lines.append(f"- Also FID in the **{sp['extractor']}** feature space (hash `{sp['hash']}`): the FID {sp['extractor']} column, and in brackets below")
    lines += [
        f"- Samples per setting: {report['num_samples']}, against the reference set: {report['reference']} "
        "(FID depends on the reference set and its size)",
    ]
    if report.get("reference_note"):
        lines.append(f"- **Not comparable with published FID-50k**: {report['reference_note']}.")
    lines += [
        f"- Data floor ({report['num_samples']} train images against the reference set): FID **{_fmt(report['floor_fid'])}**"
        + _in_other_spaces(report.get("floor_fids"), others),
        f"- Tokenizer: rFID **{_fmt(tok['rfid'])}**" + _in_other_spaces(tok.get("rfids"), others)
        + f", PSNR {_fmt(tok['psnr'])} dB, codebook usage {_fmt(tok['codebook_usage'], 3)}" + _refined_text(tok.get("refined_decoder")),
    ]
    if report.get("classifier_test_accuracy") is not None:
        lines.append(
            "- Class accuracy (conditional generators): the share of samples the dataset classifier "
            f"(hash `{report.get('classifier_hash')}`) assigns to the class they were conditioned on; "
            f"the same classifier on the real test images: **{_fmt(report['classifier_test_accuracy'], 3)}**"
        )
    return lines


def _refined_text(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    perceptual = f"{r['perceptual_net']} perceptual network x {r['perceptual_weight']:g}" if r["perceptual_weight"] > 0 else "no perceptual term"
    adversarial = f"PatchGAN hinge x {r['disc_weight']:g} (adaptive)" if r["disc"] else "no adversarial term"
    return f"; the decoder refined for {r['steps']} steps on frozen codes (MSE, {perceptual}, {adversarial})"


def _guidance(cfg: float | None, rows: list[dict[str, Any]]) -> str:
    """One guidance scale for every row, or each generator's own (its rows' cfg)."""
    if cfg is not None:
        return f"{cfg:g}"
    own = {r["generator"]: r["cfg"] for r in rows if r.get("cfg") is not None}
    return ", ".join(f"{g} {c:g}" for g, c in own.items()) or "each generator's own"


def _table_lines(report: dict[str, Any]) -> list[str]:
    others, conditional = other_spaces(report), _conditional(report)
    columns = ["generator", "sampler", "temperature", "CFG", "steps", "forward passes", "FID", *(f"FID {o}" for o in others)]
    columns += ["KID", "precision", "recall", "IS", *["class accuracy"] * conditional, "images/s"]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(["---"] * len(columns)) + " |"]
    for r in report["results"]:
        cfg = r.get("cfg", report.get("cfg"))  # a report from before rows named it: the report's
        cells = [r["generator"], r.get("sampler") or "–", f"{r['temperature']:g}", f"{cfg:g}" if cfg is not None else "–", r["steps"] or "–", r["forward_passes"], _fmt(r["fid"])]
        cells += [_fmt((r.get("fids") or {}).get(o)) for o in others]
        cells += [_fmt(r.get("kid"), 3), _fmt(r.get("precision"), 3), _fmt(r.get("recall"), 3), _fmt(r.get("isc"))]
        cells += [_fmt(r.get("class_accuracy"), 3)] * conditional + [_fmt(r["images_per_second"], 1)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def markdown(report: dict[str, Any], report_dir: Path) -> str:
    run = Path(report["run"])

    def rel(path_in_run: str) -> str:
        return os.path.relpath(run / path_in_run, report_dir)

    lines = [
        f"# vqdiff report: {report['recipe']} ({report['dataset']})",
        "",
        *spaces_sentence(report["results"]),
        *best_sentence(report["results"]),
        *_measurement_lines(report),
    ]
    for g, b in report.get("bits_per_token", {}).items():
        what = "exact" if b.get("kind") == "exact" else "ELBO upper bound"
        lines.append(f"- {g}: {_fmt(b.get('bits_per_token'), 3)} bits per token on the test split ({what})")
    lines += [
        f"- Device: {report['device']}; classifier-free guidance scale {_guidance(report['cfg'], report['results'])}; "
        f"top-k {report.get('top_k') or 'off'}; top-p {report.get('top_p') or 'off'}"
        + "".join(f"; {k} {v}" for k, v in report.get("software", {}).items()),
        "",
        *_table_lines(report),
    ]
    if report.get("isc_omitted"):
        lines += ["", f"IS column empty: {report['isc_omitted']}."]
    lines += ["", "## Plots", "", "![FID against steps](fid_vs_steps.png)", "", "![FID against speed](fid_vs_speed.png)", ""]
    if (report_dir / "learning_curve.png").exists():
        lines += ["## Learning curves", "", "![learning curves](learning_curve.png)", ""]
    if report.get("decoder_curve"):
        lines += ["## Decoder refinement", "", "| step | " + " | ".join(f"rFID {s}" for s in report["decoder_curve"]["spaces"]) + " | PSNR |",
                  "| --- |" + " --- |" * (len(report["decoder_curve"]["spaces"]) + 1)]  # fmt: skip
        for p in report["decoder_curve"]["points"]:
            lines.append(f"| {p['step']} | " + " | ".join(_fmt(p["rfids"][s]) for s in report["decoder_curve"]["spaces"]) + f" | {_fmt(p['psnr'])} |")
        lines += ["", "![decoder refinement](decoder_curve.png)", ""]
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
