"""Reports: a stored experiment folder -> <reports>/<name>/: results.parquet/.csv, table.md,
layers.md/.csv and accuracy_vs_bits.png. Reads only what Tune and the trainable left in storage
(a local folder or a pyarrow URI), so it works with no Ray, on a partial or interrupted sweep.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from dataclasses import dataclass

import pandas as pd

from .config import PATH_KEYS, PRESET_WORDS, PRESETS, TrialConfig
from .files import atomic_write
from .storage import Storage, read_meta, usable_session

LAYERS_FILE = "layers.json"
FILES = ("results.parquet", "results.csv", "table.md", "layers.md", "layers.csv", "accuracy_vs_bits.png")
RESULT_COLUMNS = (
    "trial_id trial_name status epochs_done best_top1 final_top1 best_top5 final_top5 int_top1 export_ok "
    "gpu_hours wall_seconds error checkpoint"
).split()
# what the headline table's columns already say; seeds are averaged into one row
HEADLINE_KEYS = ("w_bits", "a_bits", "model", "first", "last", "epochs", "wd", "batch_size", "seed")
_TUNE = {"trial_id": "trial_id", "status": "status", "folder": "relative_logdir", "name": "custom_trial_name"}
_EXPORT = {None: "–", True: "ok", False: "FAILED"}  # the deployment check's outcome, as a table cell


@dataclass
class Report:
    folder: str
    results: pd.DataFrame
    layers: pd.DataFrame
    table_md: str
    files: list[str]


# ----------------------------------------------------------------------------- collecting
def tune_trials(st: Storage) -> list[dict]:
    """Trials in Tune's latest whole snapshot: trial_id, status, folder, name, config."""
    session, _ = usable_session(st)
    state = st.read_json(f"experiment_state-{session}.json") if session else {}
    infos = [json.loads(entry[0]) for entry in state.get("trial_data", [])]
    return [{**{k: i.get(v) for k, v in _TUNE.items()}, "config": i.get("config") or {}} for i in infos]


def row_config(values) -> TrialConfig:
    """A TrialConfig from stored values (params.json, Tune's snapshot, a results row), not checked
    again: its files may live on other machines. Pandas NA -> None, numpy scalars -> Python."""
    return TrialConfig(**{k: _plain(values[k]) for k in TrialConfig.keys() if k in values})


def stored_configs(experiment: str) -> dict[int, dict]:
    """The configs of Tune's latest whole snapshot (what --resume runs), by the number Tune gave
    each trial (`<run>_00003`: the space's fourth point)."""
    numbered = [(re.search(r"_(\d+)$", str(t["trial_id"])), t) for t in tune_trials(Storage(experiment))]
    return {int(n[1]): row_config(t["config"]).to_dict() for n, t in numbered if n}


def trial_results(st: Storage, folder: str) -> list[dict]:
    """One trial's reported rows, one per epoch (an epoch reported again after a resume: its last
    report wins), then the trainer's `failed_reason` row if there is one."""
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
    """The last exception in Tune's error.txt, and how many failures Tune numbered (after a resume
    the file may hold only the latest)."""
    lines = [ln.strip() for ln in (st.read_text(folder, "error.txt") or "").splitlines() if ln.strip()]
    failures = max((int(m[1]) for ln in lines if (m := re.match(r"Failure # (\d+)", ln))), default=0)
    errors = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b.*:", ln)] or lines[-1:]
    if not errors:
        return None
    return f"{errors[-1]} ({count(failures, 'failure')})" if failures else errors[-1]


def _status(tune_status: str | None, failed: str | None, started: bool, finished: bool, live: bool) -> str:
    """What became of a trial, from its own results first and Tune's last snapshot second.
    `live`: a driver may run the sweep now, so an unfinished trial may be running."""
    if failed:
        return "FAILED"  # the trainer gave up (e.g. a NaN loss) and said why
    if finished:
        return "TERMINATED"
    if tune_status == "ERROR":
        return "ERROR"  # crashed more often than max_failures allows
    if tune_status == "TERMINATED" and started:
        return "STOPPED"  # early stopping (ASHA) ended it before its last epoch
    if started or tune_status in ("RUNNING", "PAUSED"):
        return "RUNNING" if live else "INTERRUPTED"  # --resume continues an interrupted one
    return "PENDING"


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
    # the latest reported checkpoint still stored: Tune writes a result line only after its
    # checkpoint is stored whole, so one that no result names (a full disk mid-copy) is never used
    stored = {name for name, is_dir in st.listdir(folder) if is_dir} if folder else set()
    named = [r.get("checkpoint_dir_name") for r in epochs]
    checkpoint = next((c for c in reversed(named) if c in stored), None)
    record = {
        **cfg.to_dict(),
        "trial_id": t["trial_id"],
        "trial_name": t["name"] or folder,
        "status": status,
        "epochs_done": done,
        "best_top1": max((float(r["top1"]) for r in epochs), default=math.nan),
        "final_top1": float(last.get("top1", math.nan)),
        "best_top5": max((float(r["top5"]) for r in epochs if "top5" in r), default=math.nan),
        "final_top5": float(last.get("top5", math.nan)),
        "int_top1": last.get("int_top1"),
        "export_ok": last.get("export_ok"),
        "gpu_hours": wall * gpu / 3600.0,
        "wall_seconds": wall,
        "error": failed or crash or (f"export check: {export_failed}" if export_failed else None),
        "checkpoint": st.uri(folder, checkpoint) if checkpoint else None,
    }
    layers = st.read_json(folder, checkpoint, LAYERS_FILE) if checkpoint else []
    about = {"trial_id": t["trial_id"], "trial_name": record["trial_name"], "label": cfg.label()}
    return record, [{**about, "epoch": done, **layer} for layer in layers or []]


def collect(experiment: str, live: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(one row per trial, one row per trial x layer, sweep meta) from a stored experiment.
    `live`: a driver may be running the sweep (else unfinished trials are INTERRUPTED)."""
    st = Storage(experiment)
    meta = read_meta(experiment)
    trials = {t["trial_id"]: t for t in tune_trials(st) if t["trial_id"]}
    known = {t["folder"] for t in trials.values()}
    for name, is_dir in st.listdir():  # trial folders newer than Tune's snapshot
        if is_dir and name not in known and st.exists(name, "params.json"):
            trial_id = next((r["trial_id"] for r in trial_results(st, name) if r.get("trial_id")), name)
            trials.setdefault(trial_id, {"trial_id": trial_id, "status": None, "folder": name, "name": name})
    gpu = float((meta.get("resources") or {}).get("gpu") or 0)
    records, layers = [], []
    for t in trials.values():
        record, rows = _trial(st, {"config": {}, **t}, gpu, live)
        records.append(record)
        layers += rows
    df = pd.DataFrame.from_records(records, columns=TrialConfig.keys() + RESULT_COLUMNS)
    df = df.sort_values("trial_id", kind="stable").reset_index(drop=True)
    df[["w_bits", "a_bits"]] = df[["w_bits", "a_bits"]].astype("Int64")
    layers.sort(key=lambda row: row["trial_id"])  # in the trials' order; each trial's layers as stored
    return df, pd.DataFrame.from_records(layers), meta


# ----------------------------------------------------------------------------- cells
def _plain(v):
    """A cell as a plain Python value (pandas NA / NaN -> None), for comparing and printing."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _sci(x: float) -> str:
    """1e-4, 2.5e-5, 0.1: compact, as in the paper's tables."""
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _cell(v, key: str = "") -> str:
    v = _plain(v)
    if v is None:
        return "FP32" if key in ("w_bits", "a_bits") else "–"
    return _sci(v) if isinstance(v, float) else str(v)


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if _plain(x) is None else format(x, spec)


def _short(text, limit: int = 160) -> str:
    """Long error messages fit a table cell; results.csv keeps them whole."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md(header: list[str], rows: list[list]) -> str:
    cells = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return pd.DataFrame(cells, columns=header).to_markdown(index=False, disable_numparse=True)


def count(n: int, noun: str) -> str:
    """`1 epoch`, `8 epochs`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _varied(df: pd.DataFrame, exclude=()) -> list[str]:
    """The config keys that take more than one value in `df`."""
    return [k for k in TrialConfig.keys() if k not in exclude and df[k].nunique(dropna=False) > 1]


def short_paths(values) -> dict[str, str]:
    """Each distinct path by its shortest ending that tells it from the others: `fp32.pt`, or
    `run1/checkpoint.pt` and `run2/checkpoint.pt` where the files share a name."""
    distinct = sorted({str(_plain(v)).rstrip("/") for v in values if _plain(v)})
    for depth in range(1, max((p.count("/") + 1 for p in distinct), default=1) + 1):
        names = {p: "/".join(p.split("/")[-depth:]) for p in distinct}
        if len(set(names.values())) == len(distinct):
            return names
    return {p: p for p in distinct}


def _path_names(df: pd.DataFrame) -> dict[str, str]:
    return {path: short for k in PATH_KEYS for path, short in short_paths(df[k]).items()}


def _value_text(key: str, v, paths: dict | None = None) -> str:
    v = _plain(v)
    if key in PATH_KEYS and v:
        return (paths or {}).get(str(v).rstrip("/")) or os.path.basename(str(v).rstrip("/"))
    return _cell(v, key)


# ----------------------------------------------------------------------------- tables
def notes(cfg: TrialConfig) -> str:
    """The first/last-layer policy in words; the bits where a preset follows the body's."""
    if cfg.is_fp32:
        return "full precision"
    words = []
    for spec, (w, a) in [(cfg.first, cfg.end_bits("first")), (cfg.last, cfg.end_bits("last"))]:
        text = PRESET_WORDS.get(spec, f"weights {w or 32}-bit, input {a or 32}-bit")
        words.append(text + (f" (W{w or 32}A{a or 32})" if PRESETS.get(spec, "-")[0] == "body" else ""))
    first, last = words
    return f"first & last layers: {first}" if first == last else f"first layer: {first}; last layer: {last}"


def params_text(cfg: TrialConfig, extra=(), paths: dict | None = None) -> str:
    """Epochs, weight decay and batch, then the `extra` keys the sweep varies, so that no two rows
    read the same. A path is named as `paths` (short_paths) names it, else by its last part."""
    text = f"{count(cfg.epochs, 'epoch')}, wd {_sci(cfg.wd)}, batch {cfg.batch_size}"
    return text + "".join(f", {k} {_value_text(k, getattr(cfg, k), paths)}" for k in extra)


def headline_extra(df: pd.DataFrame) -> list[str]:
    """The varied keys the headline's columns do not show; a data_dir that moves with the dataset
    says nothing the dataset does not."""
    extra = _varied(df, exclude=HEADLINE_KEYS)
    return [k for k in extra if not (k == "data_dir" and "dataset" in extra)]


def _acc_cell(group: pd.DataFrame, seeded: bool) -> str:
    """Final top-1; with seeds the mean ± std over the finished trials, and n."""
    done = group.loc[group["status"] == "TERMINATED", "final_top1"].astype(float)
    if seeded and len(done):
        others = group.loc[group["status"] != "TERMINATED", "status"].value_counts()
        text = f"{done.mean():.2f}" + (f" ± {done.std():.2f}" if len(done) > 1 else "")
        return f"{text} (n={len(done)}" + "".join(f"; {n} {s.lower()}" for s, n in others.items()) + ")"
    r = group.iloc[0]
    if r["status"] == "TERMINATED":
        return _fmt(r["final_top1"])
    if r["status"] in ("FAILED", "ERROR"):
        return f"{r['status'].lower()}: {_short(_plain(r['error']) or 'no reason recorded', 100)}"
    if r["status"] == "PENDING":
        return "pending"
    return f"{_fmt(r['final_top1'])} ({r['status'].lower()}, {r['epochs_done']}/{r['epochs']} epochs)"


def render_table(df: pd.DataFrame, meta: dict, name: str, experiment: str, has_layers: bool) -> str:
    summary = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [f"# {name}", (meta.get("description") or "").strip()]
    parts.append(f"{count(len(df), 'trial')} ({summary}). Experiment: `{experiment}`. Generated {when}.")
    parts.append(f"Command: `{meta['command']}`" if meta.get("command") else "")
    parts += [(meta.get("note") or "").strip(), "\n".join(f"- {line}" for line in meta.get("merged") or [])]

    # the headline: one row per cell, its seeds averaged, in trial order
    keys = [k for k in TrialConfig.keys() if k != "seed"]
    groups = [g for _, g in df.groupby(keys, dropna=False, sort=False)] if len(df) else []
    seeded = bool(meta.get("seeds")) or any(len(g) > 1 for g in groups)
    extra, paths = headline_extra(df), _path_names(df)
    headline = []
    for g in groups:
        cfg = row_config(g.iloc[0])
        network = re.sub(r"^resnet(\d+)$", r"ResNet-\1", cfg.model)
        params = params_text(cfg, extra, paths)
        headline.append([cfg.label(), network, params, notes(cfg), _acc_cell(g, seeded)])
    parts.append(_md(["Models", "Networks", "Params", "Notes", "Acc@1"], headline))
    over_seeds = ", mean ± std over seeds (n finished trials)" if seeded else ""
    parts.append(f"Acc@1: top-1 accuracy (%) on the test set after the last epoch{over_seeds}.")

    varied = _varied(df, exclude=("epochs",))  # the epochs column shows done/total
    header = ["trial", "status", *varied, "epochs", "best top-1", "final top-1", "final top-5", "int top-1"]
    header += ["export", "wall (s)", "error"]
    rows = [
        [r.trial_name, r.status, *(_cell(getattr(r, k), k) for k in varied), f"{r.epochs_done}/{r.epochs}"]
        + [_fmt(getattr(r, k)) for k in ("best_top1", "final_top1", "final_top5", "int_top1")]
        + [_EXPORT[_plain(r.export_ok)], _fmt(r.wall_seconds, ".0f"), _short(_plain(r.error) or "")]
        for r in df.itertuples()
    ]
    parts += ["## Every trial", _md(header, rows)]
    off = [_plain(v) is False for v in df["deploy_check"]]
    skipped = " Trials with deploy_check=false skip it (–)." if any(off) else ""
    if off and all(off):
        skipped = " The deployment check did not run in this sweep (deploy_check=false)."
    parts.append(
        "int top-1: top-1 of integer inference (integer codes, int accumulation, one rescale per layer; "
        "lsq/export.py). export: the ONNX model (QuantizeLinear/DequantizeLinear with the learned step "
        "sizes) agrees with the fake-quantized model in onnxruntime." + skipped
    )
    links = "[results.csv](results.csv), [results.parquet](results.parquet)"
    links += ", [layers.md](layers.md) (learned step sizes and weight error per layer)" if has_layers else ""
    parts.append(f"Files: {links}. Plot: [accuracy_vs_bits.png](accuracy_vs_bits.png).")
    return "\n\n".join(p for p in parts if p) + "\n"


def render_layers(layers: pd.DataFrame) -> str:
    out = [
        "# Per-layer diagnostics",
        "From each trial's latest checkpoint (`layers.json`): the bits of every conv/linear layer, "
        "the learned step sizes, and the weight quantization error ||ŵ - w||² / ||w||².",
    ]
    header = ["layer", "kind", "w bits", "a bits", "w step", "a step", "w rel-MSE"]
    for _, rows in layers.groupby("trial_id", sort=False):
        first = rows.iloc[0]
        if first["label"] != "FP32":  # nothing quantized, nothing learned: layers.csv still lists it
            out.append(f"## {first['trial_name']} ({first['label']}, after epoch {first['epoch']})")
            table = [
                [r.layer, r.kind, _cell(r.w_bits, "w_bits"), _cell(r.a_bits, "a_bits")]
                + [_fmt(v, ".4g") for v in (r.w_step, r.a_step, r.w_rel_mse)]
                for r in rows.itertuples()
            ]
            out.append(_md(header, table))
    return "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plot
@dataclass
class Series:
    """One line of the plot: mean top-1 (and its std over seeds, 0 for one) per body bits."""

    label: str
    bits: list[int]
    top1: list[float]
    std: list[float]


def plot_plan(df: pd.DataFrame) -> tuple[list[Series], list[tuple[str, float]], str]:
    """What accuracy_vs_bits.png shows: (lines, levels as (label, mean top-1), x label). A line per
    first/last policy, activation bits that do not follow the weights (W4A8), and each key that
    varies at the same bits; seeds make one point. FP32 and W32A* beside quantized weights: levels."""
    done = df[df["final_top1"].notna()]
    by_acts = bool(done["w_bits"].isna().all() and done["a_bits"].notna().any())  # a sweep of W32A* alone
    x = "a_bits" if by_acts else "w_bits"
    on_axis = done[done[x].notna()]
    fp32 = done[done["w_bits"].isna() & done["a_bits"].isna()]
    w32 = done[done[x].isna() & done["a_bits"].notna()]
    follows = [by_acts or _plain(a) == _plain(w) for w, a in zip(on_axis["w_bits"], on_axis["a_bits"])]
    same_bits = bool(follows) and all(follows)
    cell, paths = ["w_bits", "a_bits", "first", "last"], _path_names(done)
    # a key that only moves with the bits (weight decay by bits) stays within one line
    within = on_axis.groupby(cell, dropna=False).nunique(dropna=False).max() if len(on_axis) else {}
    other = [k for k in _varied(on_axis, exclude=(*cell, "seed")) if within[k] > 1]
    base, level = _varied(fp32, exclude=(*cell, "seed")), _varied(w32, exclude=(*cell, "seed"))

    def policy(row) -> str:
        return row["first"] if row["first"] == row["last"] else f"{row['first']}/{row['last']}"

    def words(row, keys: list[str]) -> str:
        return "".join(f", {k} {_value_text(k, row[k], paths)}" for k in keys)

    lines: dict[str, list] = {}  # label -> the index of its trials
    for (i, row), follow in zip(on_axis.iterrows(), follows):
        acts = ", activations " + ("= weights" if follow else _cell(row["a_bits"], "a_bits"))
        text = f"first/last {policy(row)}{'' if same_bits else acts}{words(row, other)}"
        lines.setdefault(text, []).append(i)
    series = []
    for text, index in lines.items():
        stats = on_axis.loc[index].groupby(x)["final_top1"].agg(["mean", "std"]).sort_index()
        std = stats["std"].fillna(0.0).tolist()
        series.append(Series(text, [int(b) for b in stats.index], stats["mean"].tolist(), std))
    levels: dict[str, list[float]] = {}
    for _, row in fp32.iterrows():
        levels.setdefault(f"FP32 ({words(row, base)[2:]})" if base else "FP32", []).append(row["final_top1"])
    for _, row in w32.sort_values(["a_bits", "first", "last", *level], kind="stable").iterrows():
        text = f"W32A{_cell(row['a_bits'])} (first/last {policy(row)}{words(row, level)})"
        levels.setdefault(text, []).append(row["final_top1"])
    xlabel = "bit-width (weights = activations of the body)" if same_bits else "weight bits of the body"
    xlabel = "activation bits of the body (weights FP32)" if by_acts else xlabel
    return series, [(text, sum(v) / len(v)) for text, v in levels.items()], xlabel


def plot_accuracy_vs_bits(df: pd.DataFrame) -> bytes:
    """Top-1 against bits (`plot_plan`), each point with its value up to 3 lines; levels dashed.
    A long legend goes below the axes, and the figure grows to hold it."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines, levels, xlabel = plot_plan(df)
    labels = [textwrap.fill(t, 90) for t in [s.label for s in lines] + [t for t, _ in levels]]
    inside = len(labels) <= 4 and all(len(t) <= 40 for t in labels)
    below = 0 if inside else 0.2 + 0.16 * sum(t.count("\n") + 1 for t in labels)
    fig = Figure(figsize=(6.4, 4.2 + below), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s, text in zip(lines, labels):
        yerr = s.std if any(s.std) else None
        color = ax.errorbar(s.bits, s.top1, yerr=yerr, marker="o", capsize=3, label=text)[0].get_color()
        for x, y in zip(s.bits, s.top1) if len(lines) <= 3 else ():  # more lines: the table has the figures
            ax.annotate(f"{y:.2f}", (x, y), (5, 4), textcoords="offset points", fontsize=7, color=color)
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # levels told apart by their dashes, all gray
    for i, ((_, value), text) in enumerate(zip(levels, labels[len(lines) :])):
        color = "gray" if i < len(styles) else "silver"
        ax.axhline(value, linestyle=styles[i % 4], color=color, linewidth=1.2, label=f"{text}: {value:.2f}")
    if lines:
        ax.set_xticks(sorted({b for s in lines for b in s.bits}))
    ax.margins(x=0.08, y=0.1)
    ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if not labels:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    elif inside:
        ax.legend(fontsize=8)
    else:
        fig.legend(loc="outside lower center", fontsize=7)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png.getvalue()


# ----------------------------------------------------------------------------- writing
def build_report(experiment: str, reports_dir: str, name: str | None = None, live: bool = False) -> Report:
    """Read the stored experiment and write every report file to <reports_dir>/<name>/, each
    whole (atomic). `live`: a driver may be running the sweep now (see `collect`)."""
    df, layers, meta = collect(experiment, live)
    name = name or meta.get("name") or os.path.basename(experiment.rstrip("/"))
    folder = os.path.join(reports_dir, name)
    table = render_table(df, meta, name, experiment, has_layers=len(layers) > 0)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    written = {"results.parquet": buf.getvalue(), "results.csv": df.to_csv(index=False), "table.md": table}
    if len(layers):
        written.update({"layers.csv": layers.to_csv(index=False), "layers.md": render_layers(layers)})
    written["accuracy_vs_bits.png"] = plot_accuracy_vs_bits(df)
    for file, data in written.items():
        atomic_write(os.path.join(folder, file), data)
    return Report(folder, df, layers, table, [os.path.join(folder, f) for f in written])
