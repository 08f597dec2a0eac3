"""Search spaces: a YAML file (format: README) -> a validated, de-duplicated list of TrialConfig.

    for each variant row (one empty row when there are no variants):
        for each combination of the grid (in file order, the last key varying fastest):
            for each seed:
                trial = TrialConfig defaults < fixed < grid values < variant row < --set < seed

Cells with equal `TrialConfig.identity()` run once (`Space.merged` says which). A mistake is a
`ConfigError` naming the file (and line), the key and what is allowed. No Ray here.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import PATH_KEYS, ConfigError, TrialConfig, coerce, did_you_mean

TOP_KEYS = tuple("name description fixed grid variants seeds resources early_stopping max_failures".split())
RESOURCE_KEYS = ("cpu", "gpu")
RESOURCE_STEP = 0.0001  # Ray's smallest share: a smaller one fails inside Tune, after Ray has started
EARLY_STOPPING = {"metric": "top1", "mode": "max", "grace_period": 1, "reduction_factor": 3}
METRIC_MODES = {"top1": "max", "top5": "max", "loss": "min", "best_top1": "max"}  # the better direction
DEFAULT_RESOURCES = {"cpu": 1, "gpu": 0}
DEFAULT_MAX_FAILURES = 2
SHIPPED_SPACES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NOT_TRIAL_KEYS = {  # a --set of these: what is meant instead
    "seeds": "the space file's `seeds:` section (seeds: 3), or --set seed=N for one seed",
    "max_failures": "--max-failures N, or the space file's `max_failures:`",
    "resources": "--cpus-per-trial / --gpus-per-trial, or the space file's `resources:`",
    "early_stopping": "the space file's `early_stopping:` section",
    "name": "--name NAME",
}


@dataclass
class Merged:
    """Cells that normalize to one trial: `kept` runs, `dropped` are the same trial again."""

    kept: int  # index into Space.trials
    dropped: list[dict]  # the dropped cells' configs (as written, before normalization)
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
    ends = [] if cfg.is_fp32 else [cfg.first if cfg.first == cfg.last else f"{cfg.first}-{cfg.last}"]
    return "_".join([f"{index:03d}", cfg.label(), *ends])


def check_name(name: Any, where: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        allowed = (
            "letters, digits, '.', '_', '-', starting with a letter or digit (it names the experiment folder)"
        )
        raise ConfigError(f"{where}: sweep name {name!r} is not allowed; allowed: {allowed}")
    return name


def read_name(path: str) -> str:
    """Just the sweep name of a space file (for --report-only, which trains nothing)."""
    doc = _yaml(path, _read(path))
    name = doc.get("name") if isinstance(doc, dict) else None
    return check_name(name or os.path.splitext(os.path.basename(path))[0], f"{path} (name)")


def load_space(path: str, overrides: list[str] | None = None) -> Space:
    """Read, validate and expand a search space file. Raises ConfigError on any mistake."""
    text = _read(path)
    doc = _yaml(path, text)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {got}")
    where = _where(path, text)
    for key in doc:
        if key not in TOP_KEYS:
            hint = did_you_mean(key, TOP_KEYS)
            raise ConfigError(
                f"{where(key)}: unknown top-level key '{key}'{hint}; allowed: {', '.join(TOP_KEYS)}"
            )
    name = check_name(doc.get("name", os.path.splitext(os.path.basename(path))[0]), where("name"))
    if not isinstance(description := doc.get("description") or "", str):
        raise ConfigError(f"{where('description')}: key 'description' must be text")
    fixed = _partial(doc.get("fixed"), where, "fixed")
    axes = _grid(doc.get("grid"), where)
    variants = _variants(doc.get("variants"), where)
    seeds = _seeds(doc.get("seeds"), where)
    resources = _resources(doc.get("resources"), where)
    early = early_stopping(doc.get("early_stopping"), where)
    max_failures = doc.get("max_failures", DEFAULT_MAX_FAILURES)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        at = where("max_failures")
        raise ConfigError(f"{at}: key 'max_failures' = {max_failures!r}: allowed: a whole number >= 0")
    sets = parse_overrides(overrides or [])
    layers = {"fixed": [fixed], "grid": [r for _, rs in axes for _, r in rs], "variants": variants or []}
    for origin, rows in {**layers, "--set": [sets]}.items():
        if seeds is not None and any("seed" in row for row in rows):
            at = where(origin) if origin != "--set" else "--set seed"
            allowed = "one of them ('seeds' repeats every cell)"
            raise ConfigError(f"{at}: key 'seed' is set in '{origin}' and by 'seeds'; allowed: {allowed}")
    cells = _cells(fixed, axes, variants, seeds, sets)
    trials, merged = _trials(path, cells, where)
    most = max(t.epochs for t in trials)  # the scheduler's max_t: ASHA asserts grace_period <= max_t
    if early and early["grace_period"] > most:
        raise ConfigError(
            f"{where('early_stopping', 'grace_period')}: grace_period {early['grace_period']} is more than the "
            f"{most} epoch{'s' * (most != 1)} of the longest trial; allowed: a whole number of epochs from 1 to "
            f"{most} (early stopping acts after grace_period epochs at the earliest)"
        )
    description = description.strip()
    return Space(
        path, name, description, trials, len(cells), merged, resources, early, max_failures, seeds, sets
    )


def _cells(fixed: dict, axes: list, variants: list[dict] | None, seeds: list[int] | None, sets: dict) -> list:
    """Every cell as its layers, lowest first: [(where in the file, {key: value})], so that a
    whole-trial error (e.g. a missing init_from file) can point at the line that set its key."""
    cells = []
    for i, variant in enumerate(variants or [{}]):
        for combo in itertools.product(*(rows for _, rows in axes)):
            for seed in seeds if seeds is not None else [None]:
                layers = [(("fixed",), fixed), *combo, (("variants", i), variant), (("--set",), sets)]
                cells.append(layers + ([(("seeds",), {"seed": seed})] if seed is not None else []))
    return cells


def _trials(path: str, cells: list, where) -> tuple[list[TrialConfig], list[Merged]]:
    """The cells validated, with absolute paths (Ray runs each trial in a folder of its own), and
    those of equal identity merged."""
    trials, first_of, groups = [], {}, {}
    for number, layers in enumerate(cells, start=1):
        values = {k: v for _, layer in layers for k, v in layer.items()}
        try:
            cfg = TrialConfig.from_dict(values, where=f"{path} (cell {number})")
        except ConfigError as e:
            raise ConfigError(_locate(str(e), path, number, layers, where)) from None
        local = {k: getattr(cfg, k) for k in PATH_KEYS if getattr(cfg, k) not in (None, "", "torchvision")}
        local = {k: os.path.abspath(os.path.expanduser(v)) for k, v in local.items() if "://" not in v}
        cfg = dataclasses.replace(cfg, **local)
        if cfg.identity() not in first_of:
            first_of[cfg.identity()] = len(trials)
            trials.append(cfg)
        groups.setdefault(first_of[cfg.identity()], []).append(values)
    return trials, [Merged(i, rows[1:], varied_keys(rows)) for i, rows in groups.items() if len(rows) > 1]


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
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: cannot read the value as YAML ({_yaml_problem(e)})") from None
        out[key] = coerce(key, value, where=f"--set {item}")
    return out


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        hint = ""
        for folder in (os.path.dirname(path) or ".", SHIPPED_SPACES):  # beside it, else the shipped ones
            if known := sorted(glob.glob("*.yaml", root_dir=folder) + glob.glob("*.yml", root_dir=folder)):
                hint = f"; spaces in {folder}: {', '.join(known)}"
                break
        raise ConfigError(f"{path}: no such search space file{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: not a regular file; allowed: a search space file (YAML)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the search space ({e})") from None


def _shape(section: Any, kind: type, at: str, name: str, what: str, empty: str = "") -> Any:
    """`section` (None where absent), once it is a `kind` (what: in words), and not empty if `empty`
    says what is allowed instead."""
    if section is not None and not isinstance(section, kind):
        raise ConfigError(f"{at}: '{name}' must be {what}, got {type(section).__name__}")
    if empty and section is not None and not section:
        raise ConfigError(
            f"{at}: '{name}' is {'empty' if kind is dict else 'an empty list'}; allowed: {empty}"
        )
    return section


def _partial(section: Any, where, *path) -> dict:
    """A mapping of TrialConfig keys, each value checked on its own (so errors can name a line)."""
    _shape(section, dict, where(*path), _dotted(path), "a mapping of config keys to values")
    for k, v in (section or {}).items():
        coerce(str(k), v, where=where(*path, k))
    return dict(section or {})


def _grid(section: Any, where) -> list[tuple[str, list[tuple[tuple, dict]]]]:
    """grid -> [(axis, [(where in the file, partial config)])]; a plain key's rows are {key: value}."""
    empty = "at least one key with a list of values, or leave 'grid' out"
    _shape(section, dict, where("grid"), "grid", "a mapping of key -> list of values", empty)
    axes, set_by = [], {}  # set_by: config key -> the axis that sets it
    for key, values in (section or {}).items():
        at = where("grid", key)
        if not isinstance(values, list):
            example = f"e.g. {key}: [{values!r}] (a single value belongs in 'fixed')"
            raise ConfigError(f"{at}: grid key '{key}' = {values!r}: expected a list of values, {example}")
        if not values:
            raise ConfigError(
                f"{at}: grid key '{key}' is an empty list; allowed: a list of at least one value"
            )
        if key in TrialConfig.keys():
            for i, v in enumerate(values):
                coerce(key, v, where("grid", key, i))
            rows = [(("grid",), {key: v}) for v in values]
        elif any(isinstance(v, dict) for v in values):  # a named axis of partial configs
            for i, v in enumerate(values):
                if not isinstance(v, dict):
                    raise ConfigError(
                        f"{where('grid', key, i)}: grid axis '{key}': item {v!r} is not a mapping, as its other "
                        "items are; allowed: every item a mapping of config keys, e.g. {w_bits: 4, a_bits: 4}"
                    )
            rows = [(("grid", key, i), _partial(v, where, "grid", key, i)) for i, v in enumerate(values)]
        else:
            keys = TrialConfig.keys()
            raise ConfigError(
                f"{at}: unknown key '{key}'{did_you_mean(key, keys)}; allowed: a config key ({', '.join(keys)}) "
                "with a list of values, or an axis name with a list of mappings of config keys"
            )
        for place, row in rows:
            for k in row:
                other = set_by.setdefault(k, str(key))
                if other != str(key):  # the later axis would win, silently
                    raise ConfigError(
                        f"{where(*place, k)}: grid axes '{other}' and '{key}' both set key '{k}', so one would "
                        "override the other in every cell; allowed: each key in one axis (put the values in one "
                        "axis of partial configs, or use variants)"
                    )
        axes.append((str(key), rows))
    return axes


def _variants(section: Any, where) -> list[dict] | None:
    empty = "at least one row, or leave it out"
    _shape(section, list, where("variants"), "variants", "a list of mappings (one row each)", empty)
    return None if section is None else [_partial(row, where, "variants", i) for i, row in enumerate(section)]


def _seeds(section: Any, where) -> list[int] | None:
    allowed = "allowed: a count N >= 1 or a list of seeds"
    if section == []:
        raise ConfigError(f"{where('seeds')}: 'seeds' is an empty list; {allowed}")
    if isinstance(section, list):
        return [coerce("seed", s, where=where("seeds", i)) for i, s in enumerate(section)]
    if section is not None and (isinstance(section, bool) or not isinstance(section, int) or section < 1):
        raise ConfigError(f"{where('seeds')}: 'seeds' = {section!r}: {allowed}")
    return None if section is None else list(range(section))


def _resources(section: Any, where) -> dict:
    _shape(section, dict, where("resources"), "resources", "a mapping like {cpu: 1, gpu: 0.5}")
    for key in section or {}:
        if key not in RESOURCE_KEYS:
            hint, allowed = did_you_mean(key, RESOURCE_KEYS), ", ".join(RESOURCE_KEYS)
            raise ConfigError(
                f"{where('resources', key)}: unknown resource '{key}'{hint}; allowed: {allowed}"
            )
    given = {k: check_resource(k, v, where("resources", k)) for k, v in (section or {}).items()}
    return {**DEFAULT_RESOURCES, **given}


def check_resource(key: str, value: Any, where: str) -> float | int:
    """cpu > 0; gpu >= 0, fractional below 1 (packed onto one card), whole above 1."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key == "cpu" and not (ok and value >= RESOURCE_STEP):
        raise ConfigError(f"{where}: resource 'cpu' = {value!r}: allowed: a number >= {RESOURCE_STEP:g}")
    if key == "gpu" and not (
        ok and (value == 0 or value >= RESOURCE_STEP) and (value <= 1 or value % 1 == 0)
    ):
        allowed = f"0, a fraction in {RESOURCE_STEP:g}..1 (shares one card) or a whole number of GPUs"
        raise ConfigError(f"{where}: resource 'gpu' = {value!r}: allowed: {allowed}")
    return int(value) if value % 1 == 0 else float(value)


def early_stopping(section: Any, where) -> dict | None:
    """The `early_stopping:` section as ASHA's settings (true: the defaults), or None: no ASHA."""
    if section is None or section is False:
        return None
    section = {} if section is True else section
    keys = ", ".join(EARLY_STOPPING)
    if not isinstance(section, dict):
        allowed = f"a mapping with keys {keys} (or true for the defaults)"
        raise ConfigError(f"{where('early_stopping')}: 'early_stopping' = {section!r}: allowed: {allowed}")
    for key in section:
        if key not in EARLY_STOPPING:
            hint = did_you_mean(key, EARLY_STOPPING)
            raise ConfigError(f"{where('early_stopping', key)}: unknown key '{key}'{hint}; allowed: {keys}")
    out = {**EARLY_STOPPING, "mode": None, **section}
    metric, gp, rf = out["metric"], out["grace_period"], out["reduction_factor"]
    at = {key: where("early_stopping", key) for key in EARLY_STOPPING}
    if not isinstance(metric, str) or metric not in METRIC_MODES:
        raise ConfigError(f"{at['metric']}: metric {metric!r}: allowed: {', '.join(METRIC_MODES)}")
    better = METRIC_MODES[metric]
    mode = out["mode"] = out["mode"] or better  # a default of max would keep the trials of highest loss
    if mode not in ("max", "min"):
        raise ConfigError(f"{at['mode']}: mode {mode!r}: allowed: max, min")
    if mode != better:
        why = f"a {'higher' if better == 'max' else 'lower'} {metric} is better"
        raise ConfigError(f"{at['mode']}: mode {mode!r} for metric {metric!r}: allowed: {better} ({why})")
    if isinstance(gp, bool) or not isinstance(gp, int) or gp < 1:
        raise ConfigError(
            f"{at['grace_period']}: grace_period {gp!r}: allowed: a whole number of epochs >= 1"
        )
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 1 < rf < math.inf:  # (NaN fails too)
        raise ConfigError(f"{at['reduction_factor']}: reduction_factor {rf!r}: allowed: a number > 1")
    return out


def _yaml(path: str, text: str) -> Any:
    """yaml.safe_load of a space file; a syntax error or a tag (!!python/...) is one ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, start = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        at, line = (f":{mark.line + 1}:{mark.column + 1}", f" (line {mark.line + 1})") if mark else ("", "")
        if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in str(e.problem):
            tag, how = str(e.problem).rsplit(" ", 1)[-1], "plain values only: numbers, text, lists, mappings"
            raise ConfigError(
                f"{path}{at}: YAML tag {tag} is not allowed{line}: search spaces are read with "
                f"yaml.safe_load ({how})"
            ) from None
        detail = _yaml_problem(e) + (f" {e.context}" if getattr(e, "context", None) else "")
        if start is not None and mark is not None and start.line != mark.line:
            detail += f" (started at line {start.line + 1})"
        raise ConfigError(f"{path}{at}: YAML syntax error{line}: {detail}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _dotted(path: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")


def _where(path: str, text: str):
    """where(*parts) -> 'file:line (grid.w_bits[2])', the line of the deepest part that has one.
    A key given twice in one mapping is an error here (YAML would keep the last, silently)."""
    lines, seen = {}, set()

    def walk(node, at: tuple) -> None:
        if id(node) in seen:  # what an alias names: read once, where it is written
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first = {}  # (tag, text) -> line: "1" and 1 are two keys to YAML
            for key, value in node.value:
                here, line, was = at + (key.value,), key.start_mark.line + 1, first.get((key.tag, key.value))
                if was and key.value != "<<":
                    raise ConfigError(
                        f"{path}:{line}: key '{_dotted(here)}' is given twice (lines {was} and "
                        f"{line}); YAML would keep only the last: allowed: each key once per mapping"
                    )
                first[(key.tag, key.value)] = lines[here] = line
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[at + (i,)] = item.start_mark.line + 1
                walk(item, at + (i,))

    walk(yaml.compose(text), ())

    def where(*parts) -> str:
        line = next((lines[parts[:n]] for n in range(len(parts), 0, -1) if parts[:n] in lines), None)
        return f"{path}:{line} ({_dotted(parts)})" if line else f"{path} ({_dotted(parts)})"

    return where


def _locate(message: str, path: str, number: int, layers: list, where) -> str:
    """Point a whole-trial error (e.g. a missing init_from file) at the line that set its key."""
    key = m.group(1) if (m := re.search(r"key '(\w+)'", message)) else None
    body = message.removeprefix(f"{path} (cell {number}): ")
    source = next((at for at, layer in reversed(layers) if key in layer), None)
    if key in PATH_KEYS and source != ("--set",):
        body += f"; set it in the file, or for every trial with --set {key}=..."
    if source is None:
        return f"{path} (cell {number}): {body}"
    return f"--set {key}: {body}" if source == ("--set",) else f"{where(*source, key)}, cell {number}: {body}"


def _text(v) -> str:
    if isinstance(v, float) and v and not 1e-3 <= abs(v) < 1e4:
        mantissa, exponent = f"{v:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_table(space: Space) -> str:
    """The trials as a plain-text table: one line per trial, then the merged cells."""
    shown = ["model", "dataset"]
    extra = [
        k for k in space.varied_keys() if k not in ("model", "dataset", "w_bits", "a_bits", "first", "last")
    ]
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
