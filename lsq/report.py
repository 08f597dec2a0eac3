"""Reports of a stored experiment (folder or pyarrow URI), from storage alone: no Ray; partial sweeps too."""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections import namedtuple

import numpy as np
import pandas as pd

from .config import PATH_KEYS, TrialConfig
from .files import atomic_write
from .storage import Storage, json_or_none, read_meta, usable_session

RESULT_COLUMNS = "trial_id trial_name status epochs_done best_top1 final_top1 best_top5 final_top5".split()
RESULT_COLUMNS += "int_top1 export_ok gpu_hours wall_seconds error checkpoint".split()
_TUNE = {"trial_id": "trial_id", "status": "status", "folder": "relative_logdir", "name": "custom_trial_name"}
_EXPORT = {None: "–", True: "ok", False: "FAILED"}  # the deployment check's outcome, as a table cell
Report = namedtuple("Report", "folder results table_md files")  # what build_report wrote


def tune_trials(st: Storage) -> list[dict]:
    """Trials in Tune's latest whole snapshot: trial_id, status, folder, name, config."""
    session, _ = usable_session(st)
    state = st.read_json(f"experiment_state-{session}.json") if session else {}
    infos = [json_or_none(entry[0]) for entry in state.get("trial_data", [])]
    return [{**{k: i.get(v) for k, v in _TUNE.items()}, "config": i.get("config") or {}} for i in infos if i]


def row_config(values) -> TrialConfig:
    """A TrialConfig from stored values, not checked again: its files may live on other machines."""
    return TrialConfig(**{k: _plain(values[k]) for k in TrialConfig.keys() if k in values})


def stored_configs(experiment: str) -> dict[int, dict]:
    """The configs of Tune's latest whole snapshot (what --resume runs), by trial number (`<run>_00003`)."""
    numbered = [(re.search(r"_(\d+)$", str(t["trial_id"])), t) for t in tune_trials(Storage(experiment))]
    return {int(n[1]): row_config(t["config"]).to_dict() for n, t in numbered if n}


def trial_results(st: Storage, folder: str) -> list[dict]:
    """One trial's rows, one per epoch (after a resume its last report wins), then any `failed_reason` row."""
    by_epoch, failed = {}, []
    for line in (st.read_text(folder, "result.json") or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if row.get("failed_reason"):
            failed = [row]
        elif "top1" in row and "epoch" in row:
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)] + failed


def _last_error(st: Storage, folder: str) -> str | None:
    """The last exception in Tune's error.txt, and how many failures Tune numbered."""
    lines = [ln.strip() for ln in (st.read_text(folder, "error.txt") or "").splitlines() if ln.strip()]
    failures = max((int(m[1]) for ln in lines if (m := re.match(r"Failure # (\d+)", ln))), default=0)
    errors = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b.*:", ln)] or lines[-1:]
    return f"{errors[-1]} ({count(failures, 'failure')})" if failures else None


def _status(tune_status: str | None, failed: str | None, started: bool, finished: bool, live: bool) -> str:
    """What became of a trial: the first rule that holds, its own results before Tune's last snapshot."""
    rules = [
        (failed, "FAILED"),  # the trainer gave up (e.g. a NaN loss) and said why
        (finished, "TERMINATED"),
        (tune_status == "ERROR", "ERROR"),  # crashed more often than max_failures allows
        (tune_status == "TERMINATED" and started, "STOPPED"),  # early stopping ended it before its last epoch
        (started or tune_status in ("RUNNING", "PAUSED"), "RUNNING" if live else "INTERRUPTED"),
    ]
    return next((status for holds, status in rules if holds), "PENDING")


def _trial(st: Storage, t: dict, gpu: float, live: bool) -> tuple[dict, list[dict]]:
    """(the results row, the per-layer rows) of one trial."""
    folder = t["folder"]
    cfg = row_config((st.read_json(folder, "params.json") if folder else None) or t["config"])
    rows = trial_results(st, folder) if folder else []
    done = max([int(r.get("epoch", 0)) for r in rows] or [0])
    failed = rows[-1]["failed_reason"] if rows and rows[-1].get("failed_reason") else None
    status = _status(t["status"], failed, bool(rows), done >= cfg.epochs, live)
    crash = _last_error(st, folder) if folder and status != "TERMINATED" else None
    wall = max((float(r["time_total_s"]) for r in rows if "time_total_s" in r), default=0.0)
    epochs = rows[:-1] if failed else rows
    last = epochs[-1] if epochs else {}
    export_failed = last.get("export_reason") if last.get("export_ok") is False else None
    # the latest checkpoint that a result names (so stored whole, not cut by a full disk) and storage holds
    stored = {name for name, is_dir in st.listdir(folder) if is_dir} if folder else set()
    named = [r.get("checkpoint_dir_name") for r in epochs]
    checkpoint = next((c for c in reversed(named) if c in stored), None)
    about = {"trial_id": t["trial_id"], "trial_name": t["name"] or folder}
    record = {
        **cfg.to_dict(),
        **about,
        "status": status,
        "epochs_done": done,
        "best_top1": max((float(r["top1"]) for r in epochs), default=math.nan),
        "best_top5": max((float(r["top5"]) for r in epochs if "top5" in r), default=math.nan),
        **{f"final_{k}": float(last.get(k, math.nan)) for k in ("top1", "top5")},
        **{k: last.get(k) for k in ("int_top1", "export_ok")},
        "gpu_hours": wall * gpu / 3600.0,
        "wall_seconds": wall,
        "error": failed or crash or (f"export check: {export_failed}" if export_failed else None),
        "checkpoint": st.uri(folder, checkpoint) if checkpoint else None,
    }
    layers = st.read_json(folder, checkpoint, "layers.json") if checkpoint else []
    return record, [{**about, "label": cfg.label(), "epoch": done, **layer} for layer in layers or []]


def collect(experiment: str, live: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(a row per trial, a row per layer, meta); `live`: unfinished trials are RUNNING, not INTERRUPTED."""
    st = Storage(experiment)
    meta = read_meta(experiment)
    trials = {t["trial_id"]: t for t in tune_trials(st) if t["trial_id"]}
    for name, is_dir in st.listdir():  # trial folders newer than Tune's snapshot
        if is_dir and name not in {t["folder"] for t in trials.values()} and st.exists(name, "params.json"):
            trial_id = next((r["trial_id"] for r in trial_results(st, name) if r.get("trial_id")), name)
            trials.setdefault(trial_id, {"trial_id": trial_id, "status": None, "folder": name, "name": name})
    gpu = float((meta.get("resources") or {}).get("gpu") or 0)
    collected = [_trial(st, {"config": {}, **trials[i]}, gpu, live) for i in sorted(trials)]
    df = pd.DataFrame.from_records([r for r, _ in collected], columns=TrialConfig.keys() + RESULT_COLUMNS)
    df[["w_bits", "a_bits"]] = df[["w_bits", "a_bits"]].astype("Int64")
    return df, pd.DataFrame.from_records([row for _, rows in collected for row in rows]), meta


def _plain(v):
    """A cell as a plain Python value (pandas NA / NaN -> None), for comparing and printing."""
    return None if pd.isna(v) else v.item() if hasattr(v, "item") else v


def _cell(v, key: str = "", spec: str = "") -> str:
    """A table cell: a number by `spec`, else a float as in the paper (1e-4, 0.1), a path's last two parts."""
    v = _plain(v)
    if v is None:
        return "FP32" if key in ("w_bits", "a_bits") else "–"
    if spec:
        return format(v, spec)
    if key in PATH_KEYS:
        return "/".join(str(v).rstrip("/").split("/")[-2:])
    if isinstance(v, float) and not (v == 0 or 1e-3 <= abs(v) < 1e4):
        return np.format_float_scientific(v, trim="-", exp_digits=1)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _md(header: list[str], rows: list[list]) -> str:
    """A Markdown table; a cell's line breaks and `|` would break its row."""
    cells = [[" ".join(str(c).split()).replace("|", "\\|") for c in r] for r in rows]
    return pd.DataFrame(cells, columns=header).to_markdown(index=False, disable_numparse=True)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _varied(df: pd.DataFrame, exclude=()) -> list[str]:
    return [k for k in TrialConfig.keys() if k not in exclude and df[k].nunique(dropna=False) > 1]


def notes(cfg: TrialConfig) -> str:
    """The first and last layers' bits, as the presets resolve them."""
    if cfg.is_fp32:
        return "full precision"
    ends = [cfg.end_bits(end) for end in ("first", "last")]
    first, last = ("FP32" if w is None and a is None else f"W{w or 32}A{a or 32}" for w, a in ends)
    return f"first & last layers: {first}" if first == last else f"first layer: {first}; last layer: {last}"


def params_text(cfg: TrialConfig, extra=()) -> str:
    """Epochs, weight decay and batch, then the `extra` keys, so that no two rows read the same."""
    text = f"{count(cfg.epochs, 'epoch')}, wd {_cell(cfg.wd)}, batch {cfg.batch_size}"
    return text + "".join(f", {k} {_cell(getattr(cfg, k), k)}" for k in extra)


def headline_extra(df: pd.DataFrame) -> list[str]:
    """The varied keys no headline column shows (seeds are averaged); data_dir where the dataset stays."""
    shown = ("w_bits", "a_bits", "model", "first", "last", "epochs", "wd", "batch_size", "seed")
    extra = _varied(df, exclude=shown)
    return [k for k in extra if not (k == "data_dir" and "dataset" in extra)]


def _acc_cell(group: pd.DataFrame, seeded: bool) -> str:
    """Final top-1; with seeds the mean ± std over the finished trials, and n; else how far it got."""
    done = group.loc[group["status"] == "TERMINATED", "final_top1"].astype(float)
    if seeded and len(done):
        others = group.loc[group["status"] != "TERMINATED", "status"].value_counts()
        text = f"{done.mean():.2f}" + (f" ± {done.std():.2f}" if len(done) > 1 else "")
        return f"{text} (n={len(done)}" + "".join(f"; {n} {s.lower()}" for s, n in others.items()) + ")"
    r = group.iloc[0]
    progress = f" ({r['status'].lower()}, {r['epochs_done']}/{r['epochs']} epochs)"
    return _cell(r["final_top1"], spec=".2f") + ("" if r["status"] == "TERMINATED" else progress)


def render_table(df: pd.DataFrame, meta: dict, name: str, experiment: str, files: list[str]) -> str:
    """table.md: the original project's table (seeds averaged), then every trial, then links to `files`."""
    summary = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    parts = [f"# {name}", (meta.get("description") or "").strip()]
    parts.append(f"{count(len(df), 'trial')} ({summary}). Experiment: `{experiment}`.")
    parts.append(f"Command: `{meta['command']}`" if meta.get("command") else "")
    parts += [(meta.get("note") or "").strip(), "\n".join(f"- {line}" for line in meta.get("merged") or [])]
    # the headline: one row per cell, its seeds averaged, in trial order
    keys = [k for k in TrialConfig.keys() if k != "seed"]
    groups = [g for _, g in df.groupby(keys, dropna=False, sort=False)] if len(df) else []
    seeded = bool(meta.get("seeds")) or any(len(g) > 1 for g in groups)
    extra, headline = headline_extra(df), []
    for g in groups:
        cfg = row_config(g.iloc[0])
        network = re.sub(r"^resnet(\d+)$", r"ResNet-\1", cfg.model)
        headline.append([cfg.label(), network, params_text(cfg, extra), notes(cfg), _acc_cell(g, seeded)])
    parts.append(_md(["Models", "Networks", "Params", "Notes", "Acc@1"], headline))
    over_seeds = ", mean ± std over seeds (n finished trials)" if seeded else ""
    parts.append(f"Acc@1: top-1 accuracy (%) on the test set after the last epoch{over_seeds}.")
    varied = _varied(df, exclude=("epochs",))  # the epochs column shows done/total
    header = ["trial", "status", *varied, "epochs", "best top-1", "final top-1", "final top-5", "int top-1"]
    rows = [
        [r.trial_name, r.status, *(_cell(getattr(r, k), k) for k in varied), f"{r.epochs_done}/{r.epochs}"]
        + [_cell(getattr(r, k), spec=".2f") for k in ("best_top1", "final_top1", "final_top5", "int_top1")]
        + [_EXPORT[_plain(r.export_ok)], _cell(r.wall_seconds, spec=".0f"), _plain(r.error) or ""]
        for r in df.itertuples()
    ]
    parts += ["## Every trial", _md([*header, "export", "wall (s)", "error"], rows)]
    skipped = " Trials with deploy_check=false skip it (–)." if not df.deploy_check.astype(bool).all() else ""
    legend = "int top-1: top-1 of integer inference (lsq/export.py). export: the ONNX model agrees with"
    parts.append(f"{legend} the fake-quantized model in onnxruntime.{skipped}")
    parts.append("Files: " + ", ".join(f"[{file}]({file})" for file in files) + ".")
    return "\n\n".join(p for p in parts if p) + "\n"


def render_layers(layers: pd.DataFrame) -> str:
    out = ["# Layers", "From each trial's latest checkpoint (– where FP32); w_rel_mse = ||ŵ - w||² / ||w||²."]
    columns = ["layer", "kind", "w_bits", "a_bits", "w_step", "a_step", "w_rel_mse"]
    for _, rows in layers[layers["label"] != "FP32"].groupby("trial_id", sort=False):  # FP32: nothing learned
        first = rows.iloc[0]
        out.append(f"## {first['trial_name']} ({first['label']}, after epoch {first['epoch']})")
        out.append(rows[columns].to_markdown(index=False, floatfmt=".4g", missingval="–"))
    return "\n\n".join(out) + "\n"


def plot_series(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """label -> mean and std of final top-1 over seeds by body bits: a line per first/last policy, per
    activation bits apart from the weights' and per key varied at the same bits; FP32 at bits NaN."""
    done = df[df["status"] == "TERMINATED"]  # as in the headline: stopped or failed trials would mislead
    cell = ["w_bits", "a_bits", "first", "last"]
    # a key that only moves with the bits (weight decay by bits) stays within one line
    spread = done.groupby(cell, dropna=False).nunique(dropna=False).max()
    other = [k for k in _varied(done, exclude=(*cell, "seed")) if spread[k] > 1]
    points = []
    for _, row in done.iterrows():
        w, a = _plain(row["w_bits"]), _plain(row["a_bits"])
        policy = row["first"] if row["first"] == row["last"] else f"{row['first']}/{row['last']}"
        acts = "" if a == w else ", weights FP32" if w is None else f", activations {_cell(a, 'a_bits')}"
        label = "FP32" if w is None and a is None else f"first/last {policy}{acts}"
        label += "".join(f", {k} {_cell(row[k], k)}" for k in other)
        points.append((label, w or a, row["final_top1"]))
    table = pd.DataFrame(points, columns=["label", "bits", "top1"])
    top1 = table.groupby(["label", "bits"], sort=False, dropna=False)["top1"]
    stats = top1.agg(["mean", "std"]).fillna(0.0)
    return {label: s.droplevel(0).sort_index() for label, s in stats.groupby(level=0, sort=False)}


def plot_accuracy_vs_bits(df: pd.DataFrame) -> bytes:
    """Final top-1 against the body's bits (`plot_series`), FP32 dashed; the legend below the axes."""
    from matplotlib.figure import Figure

    series = plot_series(df)
    fig = Figure(figsize=(6.4, 4.2 + 0.2 * len(series)), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for label, s in series.items():
        if s.index.isna().all():
            ax.axhline(s["mean"].iloc[0], linestyle="--", color="gray", label=label)
        else:
            ax.errorbar(s.index.astype(int), s["mean"], yerr=s["std"], marker="o", capsize=3, label=label)
    ax.set(xlabel="bits of the body (weights; activations where weights are FP32)", ylabel="top-1 (%)")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
    if series:
        fig.legend(loc="outside lower center", fontsize=7)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png.getvalue()


def build_report(experiment: str, reports_dir: str, name: str | None = None, live: bool = False) -> Report:
    """Write every report file to <reports_dir>/<name>/, each whole (atomic); `live` as in `collect`."""
    df, layers, meta = collect(experiment, live)
    name = name or meta.get("name") or os.path.basename(experiment.rstrip("/"))
    folder = os.path.join(reports_dir, name)
    written = {"results.parquet": df.to_parquet(index=False), "results.csv": df.to_csv(index=False)}
    if len(layers):
        written.update({"layers.csv": layers.to_csv(index=False), "layers.md": render_layers(layers)})
    written["accuracy_vs_bits.png"] = plot_accuracy_vs_bits(df)
    written["table.md"] = render_table(df, meta, name, experiment, list(written))
    for file, data in written.items():
        atomic_write(os.path.join(folder, file), data)
    return Report(folder, df, written["table.md"], [os.path.join(folder, f) for f in written])
