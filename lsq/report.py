"""Reports: a stored experiment folder -> results.parquet/.csv, table.md, layers.md/.csv, a plot.

Reads only what Tune and the trainable left in storage, so it works with no Ray running, on a
partial or interrupted sweep, and on any machine that can read the storage (a local folder or
a URI pyarrow understands, e.g. s3://bucket/runs/smoke):

    <experiment>/experiment_state-*.json   Tune's snapshot: every trial, its status, its folder
    <experiment>/sweep.json                written by sweep.py: space, resources, merged cells
    <experiment>/<trial>/params.json       the trial's config (TrialConfig keys)
    <experiment>/<trial>/result.json       one JSON line per reported epoch
    <experiment>/<trial>/error.txt         Tune's record of each crash
    <experiment>/<trial>/checkpoint_N/     checkpoint.pt + layers.json (per-layer diagnostics)

Status of a trial: TERMINATED (all epochs done), FAILED (the trainer gave up, e.g. a NaN loss:
`failed_reason`), ERROR (crashed more often than max_failures), STOPPED (early stopping),
RUNNING (started, not finished, and the sweep's driver is at work), INTERRUPTED (started, not
finished, and no driver runs the sweep: `--resume` continues it) or PENDING (not started).

Everything goes to `<reports>/<name>/`, each file written to a temporary name in the same
folder and renamed, so a crash mid-report never leaves a truncated table. No Ray here.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass

import pandas as pd

from .config import PATH_KEYS, PRESET_WORDS, PRESETS, ConfigError, TrialConfig, coerce
from .files import atomic_write
from .storage import SWEEP_FILE, Storage, experiment_exists, read_meta, usable_session, write_meta  # noqa: F401

LAYERS_FILE = "layers.json"
FILES = ("results.parquet", "results.csv", "table.md", "layers.md", "layers.csv", "accuracy_vs_bits.png")
RESULT_COLUMNS = ["trial_id", "trial_name", "status", "epochs_done", "best_top1", "final_top1", "best_top5",
                  "final_top5", "int_top1", "export_ok", "gpu_hours", "wall_seconds", "error", "checkpoint"]
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class Report:
    folder: str
    results: pd.DataFrame
    layers: pd.DataFrame
    table_md: str
    files: list[str]


# ----------------------------------------------------------------------------- collecting
def tune_trials(st: Storage) -> list[dict]:
    """Trials in Tune's latest whole experiment snapshot: trial_id, status, folder, config."""
    session, _ = usable_session(st)
    if session is None:
        return []
    state = st.read_json(f"experiment_state-{session}.json") or {}
    trials = []
    for entry in state.get("trial_data", []):
        try:
            info = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
        except (ValueError, TypeError, IndexError):  # (JSONDecodeError is a ValueError)
            continue
        trials.append({"trial_id": info.get("trial_id"), "status": info.get("status"),
                       "folder": info.get("relative_logdir"), "name": info.get("custom_trial_name"),
                       "config": info.get("config") if isinstance(info.get("config"), dict) else {}})
    return trials


def stored_configs(experiment: str) -> dict[int, dict]:
    """The TrialConfig dicts of the trials in Tune's latest whole snapshot (what --resume runs),
    by the number Tune gave each trial as it created it (`<run>_00003`: the space's fourth point)."""
    configs = {}
    for t in tune_trials(Storage(experiment)):
        number = re.search(r"_(\d+)$", str(t["trial_id"]))
        try:
            if number:
                configs[int(number.group(1))] = _config(t["config"]).to_dict()
        except (TypeError, ValueError):  # not a config this version reads: nothing to compare
            continue
    return configs


def _results(st: Storage, folder: str) -> list[dict]:
    """The reported rows of one trial, one per epoch (the last report of an epoch wins, so an
    epoch repeated after a resume counts once), plus a final `failed_reason` row if any."""
    text = st.read_text(folder, "result.json") or ""
    by_epoch, failed = {}, None
    for i, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if not isinstance(row, dict):
            raise ConfigError(f"{st.uri(folder, 'result.json')}, line {i}: {line[:60]!r} is not a result row "
                              "(a mapping, as Tune writes them); was the file edited?")
        if row.get("failed_reason"):
            failed = row
        elif "top1" in row and "epoch" in row:
            wrong = [k for k in ("epoch", "top1", "top5", "time_total_s", "epoch_seconds")
                     if k in row and (isinstance(row[k], bool) or not isinstance(row[k], (int, float)))]
            if wrong:
                raise ConfigError(f"{st.uri(folder, 'result.json')}, line {i}: '{wrong[0]}' = {row[wrong[0]]!r}: "
                                  "allowed: a number, as the trainer reports it; was the file edited?")
            by_epoch[row["epoch"]] = row
    rows = [by_epoch[e] for e in sorted(by_epoch)]
    return rows + ([failed] if failed else [])


def _last_error(st: Storage, folder: str) -> str | None:
    text = st.read_text(folder, "error.txt")
    if not text:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Tune numbers each failure ("Failure # 2 (occurred at ...)"); after a resume the file may
    # hold only the latest, so count by the highest number, not by the lines
    failures = max((int(m.group(1)) for ln in lines if (m := re.match(r"^Failure # (\d+)", ln))), default=0)
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", ln)]
    message = errors[-1] if errors else lines[-1]
    return f"{message} ({failures} failure{'s' * (failures != 1)})" if failures else message


def _latest_checkpoint(st: Storage, folder: str, rows: list[dict]) -> str | None:
    """The checkpoint of the latest reported epoch that is still stored. Tune writes a result line
    only after its checkpoint was copied whole into storage, so a checkpoint_N folder that no
    result names is a write that failed half-way (e.g. a full disk): never point at it."""
    stored = {n for n, is_dir in st.listdir(folder) if is_dir and _CHECKPOINT_DIR.match(n)}
    for r in reversed(rows):
        if r.get("checkpoint_dir_name") in stored:
            return r["checkpoint_dir_name"]
    return None


def _config(values: dict, where: str | None = None) -> TrialConfig:
    """A TrialConfig from stored values, without re-checking files that live on other machines.
    `where` (the file they come from): check each value as the schema does, so that a
    hand-edited params.json is an error naming it and the key, not a TypeError later on."""
    if where is not None and not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(values).__name__}")
    known = {k: values[k] if where is None else coerce(k, values[k], where) for k in TrialConfig.keys() if k in values}
    return TrialConfig(**known)


def row_config(row: pd.Series) -> TrialConfig:
    """The TrialConfig of a results row (pandas NA -> None, numpy scalars -> Python)."""
    return _config({k: _plain(row[k]) for k in TrialConfig.keys()})


def _status(tune_status: str | None, done: int, epochs: int, failed: str | None, started: bool,
            live: bool = False) -> str:
    """What became of a trial, from its own results first and Tune's last snapshot second.
    `live`: a driver may run the sweep now, so an unfinished trial may be running."""
    if failed:
        return "FAILED"      # the trainer gave up (e.g. a NaN loss) and said why
    if done >= epochs:
        return "TERMINATED"  # every epoch done
    if tune_status == "ERROR":
        return "ERROR"       # crashed more often than max_failures allows
    if tune_status == "TERMINATED" and started:
        return "STOPPED"     # early stopping (ASHA) ended it before its last epoch
    if started or tune_status in ("RUNNING", "PAUSED"):
        return "RUNNING" if live else "INTERRUPTED"  # --resume continues an interrupted one
    return "PENDING"


def collect(experiment: str, live: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(one row per trial, one row per trial x layer, sweep meta) from a stored experiment.
    `live`: a driver may be running the sweep (else unfinished trials are INTERRUPTED)."""
    st = Storage(experiment)
    meta = read_meta(experiment)
    gpu = float((meta.get("resources") or {}).get("gpu") or 0)

    trials = {t["trial_id"]: t for t in tune_trials(st) if t.get("trial_id")}
    by_folder = {t["folder"]: t for t in trials.values() if t.get("folder")}
    for name, is_dir in st.listdir():  # trial folders Tune's snapshot has not seen yet
        if is_dir and name not in by_folder and st.exists(name, "params.json"):
            rows = _results(st, name)
            trial_id = next((r.get("trial_id") for r in rows if r.get("trial_id")), name)
            if trial_id not in trials:
                trials[trial_id] = {"trial_id": trial_id, "status": None, "folder": name, "name": name, "config": {}}

    records, layer_rows = [], []
    for t in trials.values():
        folder = t.get("folder")
        params = st.read_json(folder, "params.json") if folder else None
        cfg = _config(params or t["config"], st.uri(folder, "params.json") if params else "Tune's experiment state")
        rows = _results(st, folder) if folder else []
        epochs = [r for r in rows if not r.get("failed_reason")]
        failed = next((r["failed_reason"] for r in rows if r.get("failed_reason")), None)
        crash = _last_error(st, folder) if folder else None
        done = max([int(r.get("epoch", 0)) for r in rows] or [0])

        status = _status(t.get("status"), done, cfg.epochs, failed, bool(rows), live)
        totals = [float(r["time_total_s"]) for r in rows if r.get("time_total_s") is not None]
        wall = max(totals) if totals else sum(float(r.get("epoch_seconds", 0.0)) for r in epochs)
        checkpoint = _latest_checkpoint(st, folder, epochs) if folder else None
        last = epochs[-1] if epochs else {}
        export_ok = _plain(last.get("export_ok"))
        export_failed = f"export check: {last['export_reason']}" if export_ok is False and last.get("export_reason") else None
        records.append({
            **cfg.to_dict(),
            "trial_id": t["trial_id"],
            "trial_name": t.get("name") or folder,
            "status": status,
            "epochs_done": done,
            "best_top1": max((float(r["top1"]) for r in epochs), default=math.nan),
            "final_top1": float(last.get("top1", math.nan)),
            "best_top5": max((float(r["top5"]) for r in epochs if "top5" in r), default=math.nan),
            "final_top5": float(last.get("top5", math.nan)),
            "int_top1": _plain(last.get("int_top1")),
            "export_ok": export_ok,
            "gpu_hours": float(wall) * gpu / 3600.0,
            "wall_seconds": float(wall),
            "error": failed or (crash if status != "TERMINATED" else None) or export_failed,
            "checkpoint": st.uri(folder, checkpoint) if checkpoint else None,
        })
        layers = st.read_json(folder, checkpoint, LAYERS_FILE) if checkpoint else None
        for row in layers or []:
            layer_rows.append({"trial_id": t["trial_id"], "trial_name": records[-1]["trial_name"],
                               "label": cfg.label(), "epoch": done, **row})

    df = pd.DataFrame.from_records(records, columns=TrialConfig.keys() + RESULT_COLUMNS)
    df = df.sort_values("trial_id", kind="stable").reset_index(drop=True)
    for k in ("w_bits", "a_bits"):
        df[k] = df[k].astype("Int64")
    layers_df = pd.DataFrame.from_records(layer_rows)
    if len(layers_df):
        order = {tid: i for i, tid in enumerate(df["trial_id"])}
        layers_df = layers_df.sort_values("trial_id", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return df, layers_df, meta


# ----------------------------------------------------------------------------- tables
def _network(model: str) -> str:
    m = re.match(r"resnet(\d+)$", model)
    return f"ResNet-{m.group(1)}" if m else model


def _sci(x: float) -> str:
    """1e-4, 2.5e-5, 0.1 -> compact text, as in the original tables."""
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:g}"
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _end_words(spec: str, cfg: TrialConfig, end: str) -> str:
    if spec in PRESET_WORDS:
        words = PRESET_WORDS[spec]
        if spec == "body" or PRESETS[spec][0] == "body":
            w, a = cfg.end_bits(end)
            words += f" ({'W' + str(w) if w else 'W32'}{'A' + str(a) if a else 'A32'})"
        return words
    w, a = cfg.end_bits(end)
    return f"weights {w or 32}-bit, input {a or 32}-bit"


def notes(cfg: TrialConfig) -> str:
    """The first/last-layer policy in words."""
    if cfg.is_fp32:
        return "full precision"
    first, last = _end_words(cfg.first, cfg, "first"), _end_words(cfg.last, cfg, "last")
    if first == last:
        return f"first & last layers: {first}"
    return f"first layer: {first}; last layer: {last}"


# what the headline table's columns already say: Models (bits), Networks, Notes (first/last), Params
# (epochs, wd, batch); seeds are averaged into one row
HEADLINE_KEYS = ("w_bits", "a_bits", "model", "first", "last", "epochs", "wd", "batch_size", "seed")


def count(n: int, noun: str) -> str:
    """`1 epoch`, `8 epochs`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def params_text(cfg: TrialConfig, extra: tuple[str, ...] | list[str] = (), paths: dict | None = None) -> str:
    """Epochs, weight decay and batch, then `extra`: the other keys the sweep varies (lr, schedule,
    dataset, ...), so that no two rows of the table read the same. A path is named as `paths`
    names it (see `short_paths`), else by its file or folder; results.csv has it whole."""
    text = f"{count(cfg.epochs, 'epoch')}, wd {_sci(cfg.wd)}, batch {cfg.batch_size}"
    for k in extra:
        text += f", {k} {_value_text(k, getattr(cfg, k), paths)}"
    return text


def short_paths(values) -> dict[str, str]:
    """Each distinct path by its shortest ending that tells it from the others: `fp32.pt`, or
    `run1/checkpoint.pt` and `run2/checkpoint.pt` where the files share a name."""
    distinct = sorted({str(_plain(v)).rstrip("/") for v in values if _plain(v)})
    for depth in range(1, max((p.count("/") + 1 for p in distinct), default=1) + 1):
        names = {p: "/".join(p.split("/")[-depth:]) for p in distinct}
        if len(set(names.values())) == len(distinct):
            return names
    return {p: p for p in distinct}


def _path_names(df: pd.DataFrame, keys) -> dict[str, str]:
    """`short_paths` of every path in the columns `keys` that name files or folders, as one map."""
    return {path: short for k in keys if k in PATH_KEYS for path, short in short_paths(df[k]).items()}


def _value_text(key: str, v, paths: dict | None = None) -> str:
    v = _plain(v)
    if key in PATH_KEYS and v:
        return (paths or {}).get(str(v).rstrip("/")) or os.path.basename(str(v).rstrip("/"))
    return _cell(v, key)


def _headline_extra(df: pd.DataFrame) -> list[str]:
    """The keys the sweep varies that the headline's columns do not show. A data_dir that varies
    with the dataset says nothing the dataset does not."""
    extra = _varied(df, exclude=HEADLINE_KEYS)
    return [k for k in extra if not (k == "data_dir" and "dataset" in extra)]


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _acc_cell(group: pd.DataFrame, seeded: bool) -> str:
    """Final top-1; with seeds mean ± std over the finished trials, and n."""
    done = group[group["status"] == "TERMINATED"]
    if not seeded:
        row = group.iloc[0]
        return _fmt(row["final_top1"]) if row["status"] == "TERMINATED" else _pending_text(row)
    if len(done) == 0:
        return _pending_text(group.iloc[0])
    values = done["final_top1"].astype(float)
    text = f"{values.mean():.2f} ± {values.std(ddof=1):.2f}" if len(values) > 1 else f"{values.mean():.2f}"
    others = group[group["status"] != "TERMINATED"]["status"].value_counts()
    unfinished = "".join(f"; {n} {status.lower()}" for status, n in others.items())
    return f"{text} (n={len(values)}{unfinished})"


def _pending_text(row) -> str:
    if row["status"] in ("FAILED", "ERROR"):
        return f"{row['status'].lower()}: {_short(_plain(row['error']) or 'no reason recorded', 100)}"
    if row["status"] == "PENDING":
        return "pending"
    return f"{_fmt(row['final_top1'])} ({row['status'].lower()}, {row['epochs_done']}/{row['epochs']} epochs)"


def _short(text: str, limit: int = 160) -> str:
    """Long error messages fit a table cell; results.csv keeps them whole."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plain(v):
    """A cell as a plain Python value (pandas NA / NaN -> None), for comparing and printing."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _varied(df: pd.DataFrame, exclude=()) -> list[str]:
    return [k for k in TrialConfig.keys() if k not in exclude and len({repr(_plain(v)) for v in df[k]}) > 1]


def _groups(df: pd.DataFrame) -> list[pd.DataFrame]:
    """Trials that differ only in their seed, in trial order."""
    keys = [k for k in TrialConfig.keys() if k != "seed"]
    ident = [repr(tuple(_plain(v) for v in row)) for row in df[keys].itertuples(index=False)]
    order = list(dict.fromkeys(ident))
    return [df[[i == key for i in ident]] for key in order]


def render_table(df: pd.DataFrame, meta: dict, name: str, experiment: str, has_layers: bool) -> str:
    counts = df["status"].value_counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    out = [f"# {name}", ""]
    if meta.get("description"):
        out += [meta["description"].strip(), ""]
    out += [f"{count(len(df), 'trial')} ({summary}). Experiment: `{experiment}`. "
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    if meta.get("command"):
        out += [f"Command: `{meta['command']}`", ""]
    if meta.get("note"):
        out += [meta["note"].strip(), ""]
    for line in meta.get("merged") or []:
        out += [f"- {line}"]
    if meta.get("merged"):
        out += [""]

    groups = _groups(df)
    seeded = bool(meta.get("seeds")) or any(len(g) > 1 for g in groups)
    extra = _headline_extra(df)
    paths = _path_names(df, extra)
    out += ["| Models | Networks | Params | Notes | Acc@1 |", "|---|---|---|---|---|"]
    for g in groups:
        cfg = row_config(g.iloc[0])
        cells = [cfg.label(), _network(cfg.model), params_text(cfg, extra, paths), notes(cfg), _acc_cell(g, seeded)]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out += ["", "Acc@1: top-1 accuracy (%) on the test set after the last epoch"
            + (", mean ± std over seeds (n finished trials)." if seeded else "."), ""]

    varied = _varied(df, exclude=("epochs",))  # the epochs column shows done/total
    header = ["trial", "status"] + varied + ["epochs", "best top-1", "final top-1", "final top-5", "int top-1", "export", "wall (s)", "error"]
    rows = []
    for _, r in df.iterrows():
        rows.append([r["trial_name"], r["status"]] + [_cell(r[k], k) for k in varied] +
                    [f"{r['epochs_done']}/{r['epochs']}", _fmt(r["best_top1"]), _fmt(r["final_top1"]),
                     _fmt(r["final_top5"]), _fmt(r["int_top1"]), _export_cell(r["export_ok"]), _fmt(r["wall_seconds"], 0), _short(_plain(r["error"]) or "")])
    off = [_plain(v) is False for v in df["deploy_check"]] if "deploy_check" in df else []
    skipped = (" The deployment check did not run in this sweep (deploy_check=false)." if off and all(off) else
               " Trials with deploy_check=false skip it (–)." if any(off) else "")
    out += ["## Every trial", "", _md_table(header, rows), "",
            "int top-1: top-1 of integer inference (integer codes, int accumulation, one rescale per layer; "
            "lsq/export.py). export: the ONNX model (QuantizeLinear/DequantizeLinear with the learned step "
            "sizes) agrees with the fake-quantized model in onnxruntime." + skipped, ""]
    links = ["[results.csv](results.csv)", "[results.parquet](results.parquet)"]
    if has_layers:
        links.append("[layers.md](layers.md) (learned step sizes and weight error per layer)")
    out += ["Files: " + ", ".join(links) + ". Plot: [accuracy_vs_bits.png](accuracy_vs_bits.png).", ""]
    return "\n".join(out)


def _export_cell(v) -> str:
    v = _plain(v)
    return "–" if v is None else ("ok" if v else "FAILED")


def _cell(v, key: str = "") -> str:
    v = _plain(v)
    if v is None:
        return "FP32" if key in ("w_bits", "a_bits") else "–"
    if isinstance(v, float):
        return _sci(v)
    return str(v)


def render_layers(df: pd.DataFrame, layers: pd.DataFrame) -> str:
    out = ["# Per-layer diagnostics", "",
           "From each trial's latest checkpoint (`layers.json`): the bits of every conv/linear layer, "
           "the learned step sizes, and the weight quantization error ||ŵ - w||² / ||w||².", ""]
    for trial_id, rows in layers.groupby("trial_id", sort=False):
        if rows["label"].iloc[0] == "FP32":
            continue  # nothing quantized, nothing learned: layers.csv still lists it
        r = df[df["trial_id"] == trial_id].iloc[0]
        out += [f"## {r['trial_name']} ({rows['label'].iloc[0]}, after epoch {rows['epoch'].iloc[0]})", ""]
        table = []
        for _, row in rows.iterrows():
            table.append([row.get("layer"), row.get("kind"), _bits(row.get("w_bits")), _bits(row.get("a_bits")),
                          _num(row.get("w_step")), _num(row.get("a_step")), _num(row.get("w_rel_mse"))])
        out += [_md_table(["layer", "kind", "w bits", "a bits", "w step", "a step", "w rel-MSE"], table), ""]
    return "\n".join(out)


def _bits(v) -> str:
    return "FP32" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}"


# ----------------------------------------------------------------------------- plot
@dataclass
class Series:
    """One line of the plot: mean top-1 (and its std over seeds, 0 for one) per body weight bits."""
    label: str
    bits: list[int]
    top1: list[float]
    std: list[float]


def _policy_text(row) -> str:
    """A row's first/last policy: `w8a8`, or `fp32/w8a8` where the two ends differ."""
    return row["first"] if row["first"] == row["last"] else f"{row['first']}/{row['last']}"


def plot_plan(df: pd.DataFrame) -> tuple[list[Series], list[tuple[str, float]], str]:
    """What accuracy_vs_bits.png shows: (lines, FP32 baselines as (label, mean top-1), x label).

    A line is one first/last policy, plus every other key that takes several values at the same
    bits; a key that only changes with the bits (weight decay by bits, as in the paper) stays
    within one line. Trials that differ only in their seed make one point, their mean. Where some
    activations do not follow the weights (W4A8), those trials make lines of their own per
    activation bits, so that W4A8 and W4A4 are never averaged into one point. FP32-weight trials
    with quantized activations (W32A8) are drawn against the activation bits in a sweep of their
    own, and beside quantized weights as levels like FP32's, one per activation bits and policy."""
    done = df[df["status"].isin(["TERMINATED", "STOPPED", "RUNNING", "INTERRUPTED", "FAILED", "ERROR"])
              & df["final_top1"].notna()]
    quant = done[done["w_bits"].notna()]
    fp32 = done[done["w_bits"].isna() & done["a_bits"].isna()]
    acts_only = done[done["w_bits"].isna() & done["a_bits"].notna()]
    # a sweep of activation bits alone (W32A8, W32A4, ...) is drawn against the activation bits
    by_acts = not len(quant) and bool(len(acts_only))
    if by_acts:
        quant = acts_only
    x = "a_bits" if by_acts else "w_bits"
    follows = [by_acts or _plain(a) == _plain(w) for w, a in zip(quant["w_bits"], quant["a_bits"])]
    same_bits = bool(len(quant)) and all(follows)
    # the activations of a line: "= weights" (W2A2, W4A4, ...) or fixed bits (W2A8, W4A8, ...)
    quant = quant.assign(_acts=["= weights" if f else _cell(a, "a_bits") for f, a in zip(follows, quant["a_bits"])])
    cell = ["w_bits", "a_bits", "first", "last"]
    paths = _path_names(done, PATH_KEYS)

    def splitting(frame: pd.DataFrame, by: list[str]) -> list[str]:  # keys with several values within a cell
        if not len(frame):
            return []
        cells = frame.groupby(by, dropna=False, sort=False) if by else [((), frame)]
        return [k for k in _varied(frame, exclude=(*cell, "seed"))
                if any(len({repr(_plain(v)) for v in g[k]}) > 1 for _, g in cells)]

    def words(keys: list[str], row) -> str:
        return ", ".join(f"{k} {_value_text(k, row[k], paths)}" for k in keys)

    lines = []
    other = splitting(quant, cell)
    line_keys = ["first", "last"] + ([] if same_bits else ["_acts"]) + other
    for _, g in (quant.groupby(line_keys, sort=False, dropna=False) if len(quant) else []):
        row = g.iloc[0]
        text = f"first/last {_policy_text(row)}" + ("" if same_bits else f", activations {row['_acts']}")
        text += f", {words(other, row)}" if other else ""
        stats = g.groupby(x)["final_top1"].agg(["mean", "std"]).sort_index()
        lines.append(Series(text, [int(b) for b in stats.index], [float(m) for m in stats["mean"]],
                            [0.0 if math.isnan(sd) else float(sd) for sd in stats["std"]]))
    baselines = []
    base_keys = _varied(fp32, exclude=(*cell, "seed")) if len(fp32) else []
    for _, g in (fp32.groupby(base_keys, sort=False, dropna=False) if base_keys else [((), fp32)]):
        if len(g):
            baselines.append(("FP32" + (f" ({words(base_keys, g.iloc[0])})" if base_keys else ""),
                              float(g["final_top1"].mean())))
    if not by_acts and len(acts_only):  # W32A8 beside W4A4: the FP32-weight trials have no place on the
        level_keys = _varied(acts_only, exclude=(*cell, "seed"))  # weight-bits axis, so they are levels too
        for _, g in acts_only.groupby(["a_bits", "first", "last", *level_keys], sort=True, dropna=False):
            row = g.iloc[0]
            baselines.append((f"W32A{_cell(row['a_bits'], 'a_bits')} (first/last {_policy_text(row)}"
                              + (f", {words(level_keys, row)})" if level_keys else ")"), float(g["final_top1"].mean())))
    xlabel = ("activation bits of the body (weights FP32)" if by_acts else
              "bit-width (weights = activations of the body)" if same_bits else "weight bits of the body")
    return lines, baselines, xlabel


def plot_accuracy_vs_bits(df: pd.DataFrame) -> bytes:
    """Top-1 against bit-width (`plot_plan`), each point with its value (up to 3 lines); FP32
    dashed. The legend sits in the axes when it is short, else below them, and the figure grows
    to hold it."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines, baselines, xlabel = plot_plan(df)
    labels = [s.label for s in lines] + [b[0] for b in baselines]
    inside = len(labels) <= 4 and all(len(t) <= 40 for t in labels)
    wrapped = [textwrap.fill(t, 90) for t in labels]
    below = 0 if inside else 0.2 + 0.16 * sum(t.count("\n") + 1 for t in wrapped)
    fig = Figure(figsize=(6.4, 4.2 + below), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s, text in zip(lines, wrapped):
        drawn = ax.errorbar(s.bits, s.top1, yerr=s.std if any(s.std) else None, marker="o", capsize=3, label=text)
        for x, y in zip(s.bits, s.top1) if len(lines) <= 3 else ():  # more lines: the table has the figures
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(5, 4), ha="left", fontsize=7,
                        color=drawn[0].get_color())
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # levels told apart by their dashes, all gray
    for i, ((label, value), text) in enumerate(zip(baselines, wrapped[len(lines):])):
        ax.axhline(value, linestyle=styles[i % len(styles)], color="gray" if i < len(styles) else "silver",
                   linewidth=1.2, label=f"{text}: {value:.2f}")
    if lines:
        ax.set_xticks(sorted({b for s in lines for b in s.bits}))
    ax.margins(x=0.08, y=0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if not labels:
        ax.text(0.5, 0.5, "no finished trials yet", ha="center", va="center", transform=ax.transAxes)
    elif inside:
        ax.legend(fontsize=8)
    else:
        fig.legend(loc="outside lower center", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing
def build_report(experiment: str, reports_dir: str, name: str | None = None, live: bool = False) -> Report:
    """Read the stored experiment and write every report file to <reports_dir>/<name>/. `live`:
    a driver may be running the sweep now (see `collect`)."""
    df, layers, meta = collect(experiment, live)
    name = name or meta.get("name") or os.path.basename(experiment.rstrip("/"))
    folder = os.path.join(reports_dir, name)
    table = render_table(df, meta, name, experiment, has_layers=len(layers) > 0)

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    written = {"results.parquet": buf.getvalue(), "results.csv": df.to_csv(index=False), "table.md": table}
    if len(layers):
        written["layers.csv"] = layers.to_csv(index=False)
        written["layers.md"] = render_layers(df, layers)
    written["accuracy_vs_bits.png"] = plot_accuracy_vs_bits(df)
    for file in written:  # before any is written: a report is replaced whole or not at all
        if os.path.isdir(os.path.join(folder, file)):
            raise IsADirectoryError(errno.EISDIR, "a folder where the report writes a file", os.path.join(folder, file))
    for file, data in written.items():
        atomic_write(os.path.join(folder, file), data)
    return Report(folder=folder, results=df, layers=layers, table_md=table,
                  files=[os.path.join(folder, f) for f in written])
