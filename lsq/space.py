"""A search space file -> a TrialConfig per cell (defaults < fixed < grid < variant < --set < seed)."""

from __future__ import annotations

import functools
import glob
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from tabulate import tabulate

from .config import PATH_KEYS, ConfigError, TrialConfig, coerce, did_you_mean, is_number

TOP_KEYS = tuple("name description fixed grid variants seeds resources early_stopping max_failures".split())
RESOURCES = {  # 0.0001 is Ray's smallest share: a smaller one fails inside Tune, after Ray has started
    "cpu": "a number >= 0.0001",
    "gpu": "0, a fraction in 0.0001..1 (shares one card) or a whole number of GPUs",
}
ASHA = {"metric": "top1", "mode": None, "grace_period": 1, "reduction_factor": 3}  # early_stopping's defaults
METRIC_MODES = {"top1": "max", "top5": "max", "loss": "min", "best_top1": "max"}  # the better direction
SHIPPED_SPACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Merged:  # cells that normalize to one trial
    kept: int  # the one that runs: an index into Space.trials
    dropped: list[dict]  # the others, their configs as written
    differ_in: list[str]  # keys whose written values differ among the merged cells

    def describe(self, trial: TrialConfig) -> str:
        n, once = len(self.dropped) + 1, f"run once (trial {self.kept + 1})"
        if not self.differ_in:
            return f"{n} identical cells ({trial.label()}) {once}"
        return f"{n} cells identical after normalization: {trial.label()} x {'/'.join(self.differ_in)} {once}"


@dataclass
class Space:
    path: str
    name: str
    description: str
    trials: list[TrialConfig]
    cells: int  # cells before merging identical ones
    merged: list[Merged]
    resources: dict
    early_stopping: dict | None
    max_failures: int
    seeds: list[int] | None
    overrides: dict  # the --set values

    def points(self) -> list[dict]:
        return [t.to_dict() for t in self.trials]

    def varied_keys(self) -> list[str]:
        return varied_keys(self.points())


def varied_keys(configs: list[dict]) -> list[str]:
    return [k for k in TrialConfig.keys() if len({repr(c.get(k)) for c in configs}) > 1]


def trial_name(config: dict, index: int) -> str:
    """A short, readable, unique trial name, e.g. '003_W4A4_w8a8-w8a8' (used as its folder too)."""
    cfg = TrialConfig.from_dict(config, where="trial config")
    ends = [] if cfg.is_fp32 else [cfg.first if cfg.first == cfg.last else f"{cfg.first}-{cfg.last}"]
    return "_".join([f"{index:03d}", cfg.label(), *ends])


def check_name(name: Any, where: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        allowed = "letters, digits, '.', '_', '-', starting with a letter or digit (it names the folders)"
        raise ConfigError(f"{where}: sweep name {name!r} is not allowed; allowed: {allowed}")
    return name


def read_name(path: str) -> str:
    """Just the sweep name of a space file (for --report-only, which trains nothing)."""
    doc = _load(path)
    name = doc.get("name") if isinstance(doc, dict) else None
    return check_name(name or os.path.splitext(os.path.basename(path))[0], f"{path} (name)")


def load_space(path: str, overrides: list[str] | None = None) -> Space:
    doc, where = _load(path), functools.partial(_at, path)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {got}")
    _known(doc, TOP_KEYS, where)
    name = check_name(doc.get("name", os.path.splitext(os.path.basename(path))[0]), where("name"))
    fixed = _shape(doc.get("fixed"), dict, where, "fixed")
    variants = _shape(doc.get("variants"), list, where, "variants", empty=False)
    variants = [(("variants", i), _shape(row, dict, where, "variants", i)) for i, row in enumerate(variants)]
    resources = _known(_shape(doc.get("resources"), dict, where, "resources"), RESOURCES, where, "resources")
    resources = {k: check_resource(k, v, where("resources", k)) for k, v in resources.items()}
    if type(failures := doc.get("max_failures", 2)) is not int or failures < 0:
        raise _refuse(where, ("max_failures",), failures, "a whole number >= 0")
    seeds = list(range(n)) if type(n := doc.get("seeds")) is int and n > 0 else n
    if seeds is not None and not (isinstance(seeds, list) and seeds):
        raise _refuse(where, ("seeds",), seeds, "a count N >= 1 or a list of seeds")
    seeds = seeds and [coerce("seed", s, where("seeds", i)) for i, s in enumerate(seeds)]
    sets = parse_overrides(overrides or [])
    cells = [
        [(("fixed",), fixed), *combo, variant, (("--set",), sets), (("seeds",), seed)]
        for variant in variants or [((), {})]
        for combo in itertools.product(*_grid(doc.get("grid"), where))
        for seed in ([{"seed": s} for s in seeds] if seeds else [{}])
    ]
    trials, merged = _trials(cells, where)
    early = early_stopping(doc.get("early_stopping"), where, max(t.epochs for t in trials))
    resources = {"cpu": 1, "gpu": 0, **resources}
    description = str(doc.get("description") or "").strip()
    return Space(path, name, description, trials, len(cells), merged, resources, early, failures, seeds, sets)


def _trials(cells: list, where) -> tuple[list[TrialConfig], list[Merged]]:
    """Each cell as a TrialConfig (paths absolute: each trial runs in its own folder); equal ones merged."""
    groups = {}  # identity -> [(trial, its config as written)]
    for number, layers in enumerate(cells, start=1):
        if layers[-1][1] and (at := next((at for at, layer in layers[:-1] if "seed" in layer), None)):
            raise ConfigError(f"{where(*at, 'seed')}: 'seed' is also set by 'seeds'; allowed: one of them")
        values = {k: v for _, layer in layers for k, v in layer.items()}
        try:
            cfg = TrialConfig.from_dict(values, where=f"cell {number}")
        except ConfigError as e:
            key = (re.findall(r"key '(\w+)'", str(e)) or [None])[0]
            at = next((at for at, layer in reversed(layers) if key in layer), None)
            hint = f"; set it in the file, or for every trial with --set {key}=..." * (key in PATH_KEYS)
            raise ConfigError(f"{where(*at, key) if at else where()}, {e}{'' if at == ('--set',) else hint}")
        paths = {k: v for k in PATH_KEYS if (v := getattr(cfg, k)) and v != "torchvision" and "://" not in v}
        cfg = cfg.replace(**{k: os.path.abspath(os.path.expanduser(v)) for k, v in paths.items()})
        groups.setdefault(cfg.identity(), []).append((cfg, values))
    merged = [[values for _, values in rows] for rows in groups.values()]
    merged = [Merged(i, rows[1:], varied_keys(rows)) for i, rows in enumerate(merged) if len(rows) > 1]
    return [rows[0][0] for rows in groups.values()], merged


def _load(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        if not glob.glob("*.y*ml", root_dir=folder):  # no space beside it: name the shipped ones
            folder = SHIPPED_SPACES
        known = ", ".join(sorted(glob.glob("*.y*ml", root_dir=folder)))
        raise ConfigError(f"{path}: no such search space file; spaces in {folder}: {known}") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, say
        raise ConfigError(f"{path}: cannot read it ({e}); allowed: a search space file (YAML)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = " ".join(f"{getattr(e, 'problem', None) or e} {getattr(e, 'context', None) or ''}".split())
        if "constructor for the tag" in problem:
            safe = "search spaces are read with yaml.safe_load (plain values only)"
            raise ConfigError(f"{at}: YAML tag {problem.rsplit(' ', 1)[-1]} is not allowed: {safe}") from None
        raise ConfigError(f"{at}: YAML syntax error: {problem}") from None


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, raw = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set epochs=3")
        if key in TOP_KEYS:
            allowed = "a trial key; this one is a section of the space file, or a flag (see --help)"
            raise ConfigError(f"--set {item!r}: '{key}' is not a trial key; allowed: {allowed}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot read the value as YAML ({' '.join(str(e).split())})")
        out[key] = coerce(key, value, where=f"--set {item}")
    return out


def _refuse(where, path: tuple, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where(*path)}: '{_at('', *path)}' = {value!r}: allowed: {allowed}")


def _known(section: dict, allowed, where, *path) -> dict:
    for key in (key for key in section if key not in allowed):
        hint = did_you_mean(key, allowed)
        raise ConfigError(f"{where(*path, key)}: unknown key '{key}'{hint}; allowed: {', '.join(allowed)}")
    return section


def _shape(section: Any, kind: type, where, *path, empty: bool = True) -> Any:
    if section is not None and not (isinstance(section, kind) and (section or empty)):
        what = ("a " if empty else "a non-empty ") + ("mapping" if kind is dict else "list of mappings")
        raise _refuse(where, path, section, f"{what} of config keys")
    return kind() if section is None else section


def _grid(section: Any, where) -> list[list[tuple[tuple, dict]]]:
    """grid -> per axis, its rows: (where in the file, a partial config)."""
    axes, set_by = [], {}  # set_by: config key -> the axis that sets it
    for axis, values in _shape(section, dict, where, "grid", empty=False).items():
        if not isinstance(values, list) or not values:
            raise _refuse(where, ("grid", axis), values, "a non-empty list ('fixed' holds single values)")
        named = ("grid", axis)
        if axis in TrialConfig.keys():
            rows = [(("grid",), {axis: v}) for v in values]
        elif any(isinstance(v, dict) for v in values):  # a named axis of partial configs
            rows = [((*named, i), _shape(v, dict, where, *named, i)) for i, v in enumerate(values)]
        else:
            hint = did_you_mean(axis, TrialConfig.keys())
            allowed = "a config key with a list of values, or an axis name with a list of mappings"
            raise ConfigError(f"{where('grid', axis)}: unknown key '{axis}'{hint}; allowed: {allowed}")
        for at, row in rows:
            for k in row:
                if set_by.setdefault(k, axis) != axis:  # the later axis would override the earlier
                    both = f"grid axes '{set_by[k]}' and '{axis}' both set key '{k}'"
                    raise ConfigError(f"{where(*at, k)}: {both}; allowed: each key in one axis")
        axes.append(rows)
    return axes


def check_resource(key: str, value: Any, where: str) -> float | int:
    least = 0 if key == "gpu" and value == 0 else 0.0001
    if not (is_number(value) and value >= least and (key == "cpu" or value <= 1 or value % 1 == 0)):
        raise ConfigError(f"{where}: resource '{key}' = {value!r}: allowed: {RESOURCES[key]}")
    return int(value) if value % 1 == 0 else float(value)


def early_stopping(section: Any, where, max_t: int) -> dict | None:
    """The `early_stopping:` section as ASHA's settings (true: the defaults), or None: no ASHA."""
    if section is None or section is False:
        return None
    if section is not True and not isinstance(section, dict):
        allowed = f"a mapping with keys {', '.join(ASHA)} (or true for the defaults)"
        raise _refuse(where, ("early_stopping",), section, allowed)
    out = _known({**ASHA, **({} if section is True else section)}, ASHA, where, "early_stopping")
    metric, epochs, rf = out["metric"], out["grace_period"], out["reduction_factor"]
    better = METRIC_MODES.get(str(metric))
    out["mode"] = out["mode"] or better  # a default of max would keep the trials of highest loss
    why = f"{better} (a {'higher' if better == 'max' else 'lower'} {metric} is better)"
    span = f"from 1 to {max_t} (the longest trial's)" if type(epochs) is int and epochs >= 1 else ">= 1"
    for key, ok, allowed in [
        ("metric", better is not None, ", ".join(METRIC_MODES)),
        ("mode", out["mode"] == better, why),
        ("grace_period", type(epochs) is int and 1 <= epochs <= max_t, f"a whole number of epochs {span}"),
        ("reduction_factor", is_number(rf) and rf > 1, "a number > 1"),
    ]:
        if not ok:
            raise _refuse(where, ("early_stopping", key), out[key], allowed)
    return out


def _at(path: str, *keys) -> str:
    """'file (grid.w_bits[2])', 'grid.w_bits[2]' for no file, or '--set key' for a key of --set."""
    if keys[:1] == ("--set",):
        return f"--set {keys[-1]}"
    dotted = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
    return f"{path} ({dotted})" if path and keys else path or dotted


def format_table(space: Space) -> str:
    shown = ["model", "dataset"]
    shown += [k for k in space.varied_keys() if k not in ("w_bits", "a_bits", "first", "last", *shown)]
    rows = [
        [i, t.label(), *(["-", "-"] if t.is_fp32 else [t.first, t.last]), *(getattr(t, k) for k in shown)]
        for i, t in enumerate(space.trials, start=1)
    ]
    table = tabulate(rows, headers=["#", "bits", "first", "last", *shown], tablefmt="pipe")
    return "\n".join([table, *(f"note: {m.describe(space.trials[m.kept])}" for m in space.merged)])
