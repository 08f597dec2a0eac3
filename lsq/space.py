"""Search spaces: a YAML file -> a validated, de-duplicated list of TrialConfig.

A search space file has these top-level keys, all optional:

    name:           the sweep's name (default: the file's stem); letters, digits, '.', '_', '-'
    description:    free text, copied into the report
    fixed:          {key: value}        TrialConfig keys shared by every trial
    grid:           {key: [values]}     the cartesian product of the lists
    variants:       [{key: value}, ...] explicit rows, e.g. the lines of a results table
    seeds:          N or [s1, s2, ...]  repeats of every cell (N means seeds 0..N-1)
    resources:      {cpu: 1, gpu: 0.5}  per trial; a fractional gpu packs trials onto one card
    early_stopping: {metric: top1, mode: max, grace_period: 1, reduction_factor: 3}
                    turns on ASHA; without it every trial runs to the end (FIFO). The mode
                    follows the metric (max for top1/top5/best_top1, min for loss)
    max_failures:   retries of a crashed trial from its last checkpoint (default 2)

A grid key is a TrialConfig key with a list of values, or an axis name of your choosing with a
list of partial configs that vary together, e.g. bits that move weights and activations as one:

    grid:
      bits: [{w_bits: 2, a_bits: 2}, {w_bits: 4, a_bits: 4}, {w_bits: null, a_bits: null}]
      wd: [1.0e-4, 5.0e-5]

The rule for building the trials:

    for each variant row (one empty row when there are no variants):
        for each combination of the grid (in file order, the last key varying fastest):
            for each seed:
                trial = TrialConfig defaults < fixed < grid values < variant row < --set < seed

`--set key=value` overrides a key for every trial; its value is read as YAML (`--set w_bits=32`,
`--set data_dir=/data/cifar`). Relative `data_dir` / `init_from` paths are made absolute (Ray
runs each trial in its own working directory). Every trial is validated by
`TrialConfig.from_dict` before anything starts; every mistake raises `ConfigError` naming the
file (with a line where there is one), the key, and what is allowed.

Cells whose `TrialConfig.identity()` is equal train the same network the same way (e.g. the
FP32 baseline crossed with several first/last policies): the first runs, the others are
recorded in `Space.merged` so the dry-run table can say so.

No Ray here: `sweep.py` turns `Space.points()` into Tune's search space.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import PATH_KEYS, ConfigError, TrialConfig, coerce

TOP_KEYS = ("name", "description", "fixed", "grid", "variants", "seeds", "resources",
            "early_stopping", "max_failures")
RESOURCE_KEYS = ("cpu", "gpu")
EARLY_STOPPING = {"metric": "top1", "mode": "max", "grace_period": 1, "reduction_factor": 3}
METRIC_MODES = {"top1": "max", "top5": "max", "loss": "min", "best_top1": "max"}  # the better direction
DEFAULT_RESOURCES = {"cpu": 1, "gpu": 0}
DEFAULT_MAX_FAILURES = 2
SHIPPED_SPACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX = 100  # it names a folder: well under the 255 bytes most file systems allow
_KEY_IN_MESSAGE = re.compile(r"key '(\w+)'")
# What a space file may make of itself through YAML aliases (&name / *name). An alias is a copy of
# what it names, so ten lines of ten aliases each expand to 10**10 values: a file is checked on
# its text, in its own size, before anything reads it as values.
MAX_VALUES = 1_000_000  # values once aliases are expanded: hand-written spaces hold hundreds
MAX_DEPTH = 100         # lists and mappings in one another: spaces need 4; Python's stack some 300
# Cells (trials before merging) of one space: each is validated here, and Tune keeps every trial
# in the driver and writes them all into its snapshot after every step. Far more than a sweep
# runs (the shipped ones have 4 to 30), few enough to validate in seconds, not to exhaust memory.
MAX_CELLS = 100_000
# Digits of an integer in a space: Python reads at most 4300 (beyond, int() is a ValueError) and no
# key takes more than 19 (TrialConfig's 2^63 - 1).
MAX_INT_DIGITS = 100
_INT_TAG = "tag:yaml.org,2002:int"
# Bytes of a space file: hand-written spaces are a few KB. Reading a YAML list of 1 MB takes some
# 10 s (4 MB: 40 s); a device (/dev/zero) or a FIFO would be read for ever.
MAX_FILE_BYTES = 1_000_000


@dataclass
class Merged:
    """Cells that normalize to one trial: `kept` runs, `dropped` are the same trial again."""

    kept: int              # index into Space.trials
    dropped: list[dict]    # the dropped cells' configs (as written, before normalization)
    differ_in: list[str]   # keys whose written values differ among the merged cells

    def describe(self, trial: TrialConfig) -> str:
        n = len(self.dropped) + 1
        if not self.differ_in:
            return f"{n} identical cells ({trial.label()}) run once (trial {self.kept + 1})"
        keys = "/".join(self.differ_in)
        return f"{n} cells identical after normalization: {trial.label()} x {keys} run once (trial {self.kept + 1})"


@dataclass
class Space:
    path: str
    name: str
    description: str
    trials: list[TrialConfig]
    cells: int                                  # cells before merging identical ones
    merged: list[Merged] = field(default_factory=list)
    resources: dict = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    early_stopping: dict | None = None
    max_failures: int = DEFAULT_MAX_FAILURES
    seeds: list[int] | None = None
    overrides: dict = field(default_factory=dict)

    def points(self) -> list[dict]:
        """One plain TrialConfig dict per trial: what `train_lsq(config)` receives."""
        return [t.to_dict() for t in self.trials]

    def varied_keys(self) -> list[str]:
        """TrialConfig keys whose value differs between trials, in TrialConfig order."""
        return varied_keys(self.points())


def varied_keys(configs: list[dict]) -> list[str]:
    keys = [k for k in TrialConfig.keys() if any(k in c for c in configs)]
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def trial_name(config: dict, index: int) -> str:
    """A short, readable, unique trial name, e.g. '003_W4A4_w8a8-w8a8' (used as its folder too)."""
    cfg = TrialConfig.from_dict(config, where="trial config")
    parts = [f"{index:03d}", cfg.label()]
    if not cfg.is_fp32:
        parts.append(cfg.first if cfg.first == cfg.last else f"{cfg.first}-{cfg.last}")
    return "_".join(parts)


# ----------------------------------------------------------------------------- loading
def load_space(path: str, overrides: list[str] | None = None) -> Space:
    """Read, validate and expand a search space file. Raises ConfigError on any mistake."""
    text = _read(path)
    lines = _checked_lines(text, path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_message(path, e)) from None
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {got}")
    where = _Where(path, lines)
    if lines.duplicates:
        key_path, first, again = lines.duplicates[0]
        raise ConfigError(f"{path}:{again}: key '{_dotted(key_path)}' is given twice (lines {first} and {again}); "
                          "YAML would keep only the last: allowed: each key once per mapping")

    for key in doc:
        if key not in TOP_KEYS:
            raise ConfigError(f"{where(key)}: unknown top-level key '{key}'{_did_you_mean(key, TOP_KEYS)}; "
                              f"allowed: {', '.join(TOP_KEYS)}")

    name = doc.get("name", os.path.splitext(os.path.basename(path))[0])
    check_name(name, where("name"))
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where('description')}: key 'description' must be text")

    fixed = _partial(doc.get("fixed"), where, ("fixed",))
    axes = _grid(doc.get("grid"), where)
    variants = _variants(doc.get("variants"), where)
    seeds = _seeds(doc.get("seeds"), where)
    resources = _resources(doc.get("resources"), where)
    early = _early_stopping(doc.get("early_stopping"), where)
    max_failures = _count(doc.get("max_failures", DEFAULT_MAX_FAILURES), where("max_failures"), "max_failures")
    sets = parse_overrides(overrides or [])

    if seeds is not None:
        for origin, rows in (("fixed", [fixed]), ("grid", [r for _, rows in axes for _, r, _ in rows]),
                             ("variants", variants or []), ("--set", [sets])):
            if any("seed" in r for r in rows):
                raise ConfigError(f"{where(origin) if origin != '--set' else '--set seed'}: key 'seed' is set in "
                                  f"'{origin}' and by 'seeds'; allowed: one of them ('seeds' repeats every cell)")
    _check_cells(path, axes, variants, seeds)
    cells = _cells(fixed, axes, variants, seeds, sets)

    trials, first_of, groups = [], {}, {}
    for number, (values, origin) in enumerate(cells, start=1):
        try:
            cfg = TrialConfig.from_dict(values, where=f"{path} (cell {number})")
        except ConfigError as e:
            raise ConfigError(_locate(str(e), path, number, origin, where)) from None
        cfg = dataclasses.replace(cfg, **_absolute_paths(cfg))
        ident = cfg.identity()
        if ident not in first_of:
            first_of[ident] = len(trials)
            trials.append(cfg)
        groups.setdefault(first_of[ident], []).append(values)
    merged = [Merged(kept=i, dropped=rows[1:], differ_in=varied_keys(rows))
              for i, rows in groups.items() if len(rows) > 1]
    most = max(t.epochs for t in trials)  # the scheduler's max_t (sweep.py): ASHA asserts grace_period <= max_t
    if early and early["grace_period"] > most:
        raise ConfigError(f"{where('early_stopping', 'grace_period')}: grace_period {early['grace_period']} is more "
                          f"than the {most} epoch{'s' * (most != 1)} of the longest trial; allowed: a whole number "
                          f"of epochs from 1 to {most} (early stopping acts after grace_period epochs at the earliest)")

    return Space(path=path, name=name, description=description.strip(), trials=trials, cells=len(cells),
                 merged=merged, resources=resources, early_stopping=early, max_failures=max_failures,
                 seeds=seeds, overrides=sets)


def _check_cells(path: str, axes: list, variants: list[dict] | None, seeds: list[int] | None) -> None:
    """At most MAX_CELLS cells, counted before any is made."""
    factors = ([(len(variants), "variants")] if variants else []) + [(len(rows), axis) for axis, rows in axes] \
        + ([(len(seeds), "seeds")] if seeds else [])
    n = math.prod(count for count, _ in factors)
    if n > MAX_CELLS:
        product = " x ".join(f"{count:,} {what}" for count, what in factors)
        raise ConfigError(f"{path}: {n:,} cells ({product}); allowed: at most {MAX_CELLS:,} cells in one space "
                          "(split it into several sweeps)")


def _cells(fixed: dict, axes: list, variants: list[dict] | None, seeds: list[int] | None,
           sets: dict) -> list[tuple[dict, dict]]:
    """Every cell as (values, origin): origin maps each key to the path in the file that set it,
    so a whole-trial error (e.g. a missing init_from file) can point at its line."""
    cells = []
    for v_index, variant in enumerate(variants or [{}]):
        for combo in itertools.product(*(rows for _, rows in axes)):
            for seed in seeds if seeds is not None else [None]:
                values, origin = {}, {}

                def put(layer: dict, path: tuple, key_in_path: bool = True) -> None:
                    for k, v in layer.items():
                        values[k], origin[k] = v, path + (k,) if key_in_path else path

                put(fixed, ("fixed",))
                for (axis, _), (r_index, row, plain) in zip(axes, combo):
                    if plain:  # grid: {wd: [...]}: the line of the key
                        put(row, ("grid", axis), key_in_path=False)
                    else:      # grid: {bits: [{w_bits: 2, ...}]}: the line of the row's key
                        put(row, ("grid", axis, r_index))
                put(variant, ("variants", v_index))
                put(sets, ("--set",), key_in_path=False)
                if seed is not None:
                    put({"seed": seed}, ("seeds",), key_in_path=False)
                cells.append((values, origin))
    return cells


def check_name(name: Any, where: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > NAME_MAX:
        raise ConfigError(f"{where}: sweep name {name!r} is not allowed; allowed: up to {NAME_MAX} letters, digits, "
                          "'.', '_', '-', starting with a letter or digit (it names the experiment folder)")
    return name


_NOT_TRIAL_KEYS = {
    "seeds": "the space file's `seeds:` section (seeds: 3), or --set seed=N for one seed",
    "max_failures": "--max-failures N, or the space file's `max_failures:`",
    "resources": "--cpus-per-trial / --gpus-per-trial, or the space file's `resources:`",
    "early_stopping": "the space file's `early_stopping:` section",
    "name": "--name NAME",
}


def parse_overrides(items: list[str]) -> dict:
    """`--set key=value` items -> {key: validated value}. The value is parsed as YAML."""
    out = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set epochs=3")
        if key in _NOT_TRIAL_KEYS:  # a section of the space file, or a flag: not a trial's key
            raise ConfigError(f"--set {item!r}: '{key}' is not a trial key; allowed: {_NOT_TRIAL_KEYS[key]}")
        _checked_lines(raw, f"--set {key}", in_file=False)  # (not the item: it may be long)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot read the value as YAML ({_yaml_problem(e)})") from None
        out[key] = coerce(key, value, where=f"--set {item}")
    return out


# ----------------------------------------------------------------------------- sections
def _read(path: str) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES (opened without waiting: a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, a device such as /dev/zero
            os.close(fd)
            raise ConfigError(f"{path}: not a regular file; allowed: a search space file (YAML)")
        with open(fd, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes; allowed: a search space file of at "
                              f"most {MAX_FILE_BYTES:,} bytes")
        return data.decode("utf-8")
    except FileNotFoundError:
        hint = ""
        for folder in (os.path.dirname(path) or ".", SHIPPED_SPACES):  # beside it, else the shipped ones
            known = sorted(f for f in os.listdir(folder) if f.endswith((".yaml", ".yml"))) if os.path.isdir(folder) else []
            if known:
                hint = f"; spaces in {folder}: {', '.join(known)}"
                break
        raise ConfigError(f"{path}: no such search space file{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the search space ({e})") from None


def _partial(section: Any, where, path: tuple) -> dict:
    """A mapping of TrialConfig keys, each value checked on its own (so errors can name a line)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where(*path)}: '{_dotted(path)}' must be a mapping of config keys to values, "
                          f"got {type(section).__name__}")
    for k, v in section.items():
        coerce(str(k), v, where=where(*path, k))
    return dict(section)


def _grid(section: Any, where) -> list[tuple[str, list[tuple[int, dict, bool]]]]:
    """grid -> [(axis, [(index, partial config, is a plain key)])]; a plain key gives rows {key: v}."""
    if section is None:
        return []
    if not isinstance(section, dict):
        raise ConfigError(f"{where('grid')}: 'grid' must be a mapping of key -> list of values, got {type(section).__name__}")
    if not section:
        raise ConfigError(f"{where('grid')}: 'grid' is empty; allowed: at least one key with a list of values, "
                          "or leave 'grid' out")
    axes = []
    set_by: dict[str, str] = {}  # config key -> the axis that sets it
    for key, values in section.items():
        if not isinstance(values, list):
            raise ConfigError(f"{where('grid', key)}: grid key '{key}' = {values!r}: expected a list of values, "
                              f"e.g. {key}: [{values!r}] (a single value belongs in 'fixed')")
        if not values:
            raise ConfigError(f"{where('grid', key)}: grid key '{key}' is an empty list; allowed: a list of at least one value")
        if key in TrialConfig.keys():
            rows = [(i, {key: v}, True) for i, v in enumerate(values)]
            for i, v in enumerate(values):
                coerce(key, v, where=where("grid", key, i))
        elif any(isinstance(v, dict) for v in values):  # a named axis of partial configs
            for i, v in enumerate(values):
                if not isinstance(v, dict):
                    raise ConfigError(f"{where('grid', key, i)}: grid axis '{key}': item {v!r} is not a mapping, as its "
                                      "other items are; allowed: every item a mapping of config keys, e.g. "
                                      "{w_bits: 4, a_bits: 4}")
            rows = [(i, _partial(v, where, ("grid", key, i)), False) for i, v in enumerate(values)]
        else:
            raise ConfigError(f"{where('grid', key)}: unknown key '{key}'{_did_you_mean(key, TrialConfig.keys())}; "
                              f"allowed: a config key ({', '.join(TrialConfig.keys())}) with a list of values, "
                              "or an axis name with a list of mappings of config keys")
        for i, row, plain in rows:
            for k in row:
                other = set_by.setdefault(k, str(key))
                if other != str(key):  # the later axis would win in every cell, silently
                    at = where("grid", key) if plain else where("grid", key, i, k)
                    raise ConfigError(f"{at}: grid axes '{other}' and '{key}' both set key '{k}', so one would "
                                      "override the other in every cell; allowed: each key in one axis (put the "
                                      "values in one axis of partial configs, or use variants)")
        axes.append((str(key), rows))
    return axes


def _variants(section: Any, where) -> list[dict] | None:
    if section is None:
        return None
    if not isinstance(section, list):
        raise ConfigError(f"{where('variants')}: 'variants' must be a list of mappings (one row each), "
                          f"got {type(section).__name__}")
    if not section:
        raise ConfigError(f"{where('variants')}: 'variants' is an empty list; allowed: at least one row, or leave it out")
    return [_partial(row, where, ("variants", i)) for i, row in enumerate(section)]


def _seeds(section: Any, where) -> list[int] | None:
    if section is None:
        return None
    if isinstance(section, list):
        if not section:
            raise ConfigError(f"{where('seeds')}: 'seeds' is an empty list; allowed: a count N >= 1 or a list of seeds")
        return [coerce("seed", s, where=where("seeds", i)) for i, s in enumerate(section)]
    if isinstance(section, bool) or not isinstance(section, int) or not 1 <= section <= MAX_CELLS:
        raise ConfigError(f"{where('seeds')}: 'seeds' = {section!r}: allowed: a count N >= 1 (at most {MAX_CELLS:,}, "
                          "as many as the cells of a space) or a list of seeds")
    return list(range(section))


def _resources(section: Any, where) -> dict:
    res = dict(DEFAULT_RESOURCES)
    if section is None:
        return res
    if not isinstance(section, dict):
        raise ConfigError(f"{where('resources')}: 'resources' must be a mapping like {{cpu: 1, gpu: 0.5}}")
    for key, value in section.items():
        if key not in RESOURCE_KEYS:
            raise ConfigError(f"{where('resources', key)}: unknown resource '{key}'{_did_you_mean(key, RESOURCE_KEYS)}; "
                              f"allowed: {', '.join(RESOURCE_KEYS)}")
        res[key] = check_resource(key, value, where("resources", key))
    return res


RESOURCE_STEP = 0.0001  # Ray's smallest share of a resource: a smaller one fails inside Tune, after Ray has started


def check_resource(key: str, value: Any, where: str) -> float | int:
    """cpu > 0; gpu >= 0, fractional below 1 (packed onto one card), whole above 1."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and key == "cpu":
        ok = value >= RESOURCE_STEP
    if ok and key == "gpu":
        ok = (value == 0 or value >= RESOURCE_STEP) and (value <= 1 or float(value).is_integer())
    if not ok:
        allowed = (f"a number >= {RESOURCE_STEP:g}" if key == "cpu" else
                   f"0, a fraction in {RESOURCE_STEP:g}..1 (shares one card) or a whole number of GPUs")
        raise ConfigError(f"{where}: resource '{key}' = {value!r}: allowed: {allowed}")
    return int(value) if float(value).is_integer() else float(value)


def _early_stopping(section: Any, where) -> dict | None:
    if section is None or section is False:
        return None
    if section is True:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where('early_stopping')}: 'early_stopping' = {section!r}: allowed: a mapping with keys "
                          f"{', '.join(EARLY_STOPPING)} (or true for the defaults)")
    out = dict(EARLY_STOPPING)
    for key, value in section.items():
        if key not in EARLY_STOPPING:
            raise ConfigError(f"{where('early_stopping', key)}: unknown key '{key}'{_did_you_mean(key, EARLY_STOPPING)}; "
                              f"allowed: {', '.join(EARLY_STOPPING)}")
        out[key] = value
    if not isinstance(out["metric"], str) or out["metric"] not in METRIC_MODES:
        raise ConfigError(f"{where('early_stopping', 'metric')}: metric {out['metric']!r}: allowed: {', '.join(METRIC_MODES)}")
    better = METRIC_MODES[out["metric"]]
    if "mode" not in section:  # a default of max would make ASHA keep the trials of highest loss
        out["mode"] = better
    if out["mode"] not in ("max", "min"):
        raise ConfigError(f"{where('early_stopping', 'mode')}: mode {out['mode']!r}: allowed: max, min")
    if out["mode"] != better:
        raise ConfigError(f"{where('early_stopping', 'mode')}: mode {out['mode']!r} for metric {out['metric']!r}: "
                          f"allowed: {better} (a {'higher' if better == 'max' else 'lower'} {out['metric']} is better)")
    gp = out["grace_period"]
    if isinstance(gp, bool) or not isinstance(gp, int) or gp < 1:
        raise ConfigError(f"{where('early_stopping', 'grace_period')}: grace_period {gp!r}: allowed: a whole number "
                          "of epochs >= 1")
    rf = out["reduction_factor"]
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 1 < rf < math.inf:  # (NaN fails too)
        raise ConfigError(f"{where('early_stopping', 'reduction_factor')}: reduction_factor {rf!r}: allowed: a number > 1")
    return out


def _count(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: key '{key}' = {value!r}: allowed: a whole number >= 0")
    return value


def _absolute_paths(cfg: TrialConfig) -> dict:
    """Relative data_dir / init_from -> absolute: Ray runs each trial in its own working directory."""
    out = {}
    for k in PATH_KEYS:
        v = getattr(cfg, k)
        if isinstance(v, str) and v and v != "torchvision" and "://" not in v:
            out[k] = os.path.abspath(os.path.expanduser(v))
    return out


# ----------------------------------------------------------------------------- messages
def _did_you_mean(key: Any, allowed) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _dotted(path: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _yaml_message(path: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    line = f" (line {mark.line + 1})" if mark is not None else ""
    if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in str(e.problem):
        tag = str(e.problem).rsplit(" ", 1)[-1]
        return (f"{path}{at}: YAML tag {tag} is not allowed{line}: search spaces are read with "
                "yaml.safe_load (plain values only: numbers, text, lists, mappings)")
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    detail = _yaml_problem(e) + (f" {context}" if context else "")
    if context_mark is not None and mark is not None and context_mark.line != mark.line:
        detail += f" (started at line {context_mark.line + 1})"
    return f"{path}{at}: YAML syntax error{line}: {detail}"


class _KeyLines:
    """Line numbers of the keys and list items in a YAML text, for messages: path -> line; and
    what its aliases make of it (`_checked_lines` refuses a text that is too much). All of it in
    the text's own size: nothing here expands an alias. A text that is not YAML gives nothing
    (yaml.safe_load says what is wrong with it)."""

    def __init__(self, text: str):
        self.lines: dict[tuple, int] = {}
        self.duplicates: list[tuple[tuple, int, int]] = []  # (path, first line, repeated line)
        self.recursive = None  # (alias event, its anchor's mark): an alias inside the list or mapping it names
        self.too_deep = None   # the mark of a list or mapping nested deeper than MAX_DEPTH
        self.values = 0        # values in the document, each alias counted as a copy of what it names
        self.biggest = None    # (top-level key, its values) of the most values
        self.long_int = None   # (what, mark, digits) of the first integer of more than MAX_INT_DIGITS digits
        self._values: dict[int, int] = {}  # id(node) -> its values: each node is walked once
        try:
            recursive, too_deep = _scan(text)
            root = None if too_deep else yaml.compose(text)  # (compose recurses once per level)
            if not (recursive or too_deep):
                self.values = self._walk(root, ())
                if isinstance(root, yaml.MappingNode):
                    sizes = [(k.value, self._values.get(id(v), 0)) for k, v in root.value if isinstance(k, yaml.ScalarNode)]
                    self.biggest = max(sizes, key=lambda kv: kv[1], default=None)
            self.recursive, self.too_deep = recursive, too_deep
        except yaml.YAMLError:
            pass

    def _walk(self, node, path) -> int:
        """Record the lines in `node`; return its values. An alias is the very node it names: a
        node met again is not walked again (its lines are those of where it was written)."""
        if id(node) in self._values:
            return self._values[id(node)]
        self._check_int(node, f"key '{_dotted(path)}'" if path else "the value")
        n = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple, int] = {}  # this mapping's keys: (tag, text) -> line ("1" and 1 are two keys)
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):  # a list or mapping as a key: safe_load refuses it
                    continue
                self._check_int(key, f"a key in '{_dotted(path)}'" if path else "a top-level key")
                p, line = path + (key.value,), key.start_mark.line + 1
                if (key.tag, key.value) in seen and key.value != "<<":  # YAML would keep only the last, silently
                    self.duplicates.append((p, seen[(key.tag, key.value)], line))
                seen[(key.tag, key.value)] = line
                self.lines[p] = line
                n += 1 + self._walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                n += self._walk(item, path + (i,))
        self._values[id(node)] = n
        return n

    def _check_int(self, node, what: str) -> None:
        if self.long_int is None and isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG:
            digits = len(node.value.lstrip("+-").replace("_", ""))
            if digits > MAX_INT_DIGITS:
                self.long_int = (what, node.start_mark, digits)

    def find(self, path: tuple) -> int | None:
        while path:  # the deepest part of the path that has a line
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _scan(text: str) -> tuple:
    """(recursive, too_deep) of `_KeyLines`, from the parser's events (no recursion here, nothing
    expanded). An alias names an earlier anchor: it is inside what it names (a structure that
    contains itself) exactly when that anchor's list or mapping is still open."""
    open_anchors: list = []  # the anchors of the lists and mappings being read, outermost first
    marks: dict = {}         # anchor -> where it is
    recursive = too_deep = None
    for event in yaml.parse(text):
        if isinstance(event, yaml.CollectionStartEvent):
            open_anchors.append(event.anchor)
            if event.anchor is not None:
                marks[event.anchor] = event.start_mark
            if len(open_anchors) > MAX_DEPTH and too_deep is None:
                too_deep = event.start_mark
        elif isinstance(event, yaml.CollectionEndEvent):
            open_anchors.pop()
        elif isinstance(event, yaml.AliasEvent) and event.anchor in open_anchors and recursive is None:
            recursive = (event, marks[event.anchor])
    return recursive, too_deep


def _checked_lines(text: str, where: str, in_file: bool = True) -> _KeyLines:
    """The text's `_KeyLines`, once it is known that reading it as values is bounded: no alias in
    what it names, at most MAX_DEPTH levels, at most MAX_VALUES values with aliases expanded.
    `where`: the file (or the --set item) for messages."""
    lines = _KeyLines(text)

    def at(mark) -> str:
        return f"{where}:{mark.line + 1}:{mark.column + 1}" if in_file else f"{where} (column {mark.column + 1})"

    if lines.recursive:
        alias, anchor = lines.recursive
        raise ConfigError(f"{at(alias.start_mark)}: YAML alias *{alias.anchor} refers to &{alias.anchor} (line "
                          f"{anchor.line + 1}), the list or mapping it is in: recursive structures are not allowed; "
                          "allowed: an alias of a value that does not contain it")
    if lines.too_deep:
        raise ConfigError(f"{at(lines.too_deep)}: lists and mappings nested more than {MAX_DEPTH} levels deep; "
                          f"allowed: at most {MAX_DEPTH}")
    if lines.long_int:
        what, mark, digits = lines.long_int
        raise ConfigError(f"{at(mark)}: {what} is an integer of {digits:,} digits; allowed: at most "
                          f"{MAX_INT_DIGITS} digits (no key takes more than 19)")
    if lines.values > MAX_VALUES:
        what = f"the {'file' if in_file else 'value'} holds {lines.values:,} values"
        if lines.biggest:  # the top-level key of the most values
            key, n = lines.biggest
            where = f"{where}:{lines.find((key,))} ({key})"
            what = f"'{key}' holds {n:,} values ({lines.values:,} in all)"
        raise ConfigError(f"{where}: with its YAML aliases expanded, {what}; allowed: at most {MAX_VALUES:,} "
                          "values in all, each alias counted as a copy of what it names")
    return lines


class _Where:
    """'file:line (grid.w_bits[2])' for a path inside the file."""

    def __init__(self, path: str, lines: _KeyLines):
        self.path, self.lines = path, lines

    def __call__(self, *parts) -> str:
        line = self.lines.find(tuple(parts))
        return f"{self.path}:{line} ({_dotted(parts)})" if line else f"{self.path} ({_dotted(parts)})"


def _locate(message: str, path: str, number: int, origin: dict, where) -> str:
    """Point a whole-trial error (e.g. a missing init_from file) at the line that set the key."""
    m = _KEY_IN_MESSAGE.search(message)
    key = m.group(1) if m else None
    prefix = f"{path} (cell {number}): "
    body = message[len(prefix):] if message.startswith(prefix) else message
    source = origin.get(key)
    if source is None:
        at = f"{path} (cell {number})"
    elif source == ("--set",):
        at = f"--set {key}"
    else:
        at = f"{where(*source)}, cell {number}"
    if key in PATH_KEYS and source != ("--set",):
        body += f"; set it in the file, or for every trial with --set {key}=..."
    return f"{at}: {body}"


# ----------------------------------------------------------------------------- dry-run table
def read_name(path: str) -> str:
    """Just the sweep name of a space file (for --report-only, which trains nothing)."""
    text = _read(path)
    _checked_lines(text, path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_message(path, e)) from None
    name = doc.get("name") if isinstance(doc, dict) else None
    return check_name(name or os.path.splitext(os.path.basename(path))[0], f"{path} (name)")


def _text(v) -> str:
    if isinstance(v, float) and v and not 1e-3 <= abs(v) < 1e4:
        mantissa, exponent = f"{v:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_table(space: Space) -> str:
    """The trials as a plain-text table: one line per trial, then the merged cells."""
    shown = ["model", "dataset"]
    extra = [k for k in space.varied_keys() if k not in ("model", "dataset", "w_bits", "a_bits", "first", "last")]
    header = ["#", "bits", "first", "last"] + shown + extra
    rows = []
    for i, t in enumerate(space.trials, start=1):
        ends = ["-", "-"] if t.is_fp32 else [t.first, t.last]
        rows.append([str(i), t.label()] + ends + [_text(getattr(t, k)) for k in shown + extra])
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for m in space.merged:
        lines.append(f"note: {m.describe(space.trials[m.kept])}")
    return "\n".join(lines)
