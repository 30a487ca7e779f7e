"""The study's plan: per task, standard training against each regularizer family at several strengths.

A family is one recipe file whose regularizers are trained at ``multiplier × `` the recipe's
strength (a decade apart by default: 0.1, 1, 10). The strength is the regularizer weight, a
number or a schedule (``interp_train.schedules``); a schedule's levels (``value``, and ``start`` /
``final`` where set) are all multiplied, so a warm-up keeps its shape and only its height changes:

    w'(t) = multiplier · w(t).

A regularizer that replaces the task loss (adversarial training: the model trains on the attacked
loss alone) has no strength in its weight — w only rescales the whole loss, which Adam's update
ignores — so its family names another numeric argument to scale (``Family(recipe, "epsilon")``,
the attack radius); scaling such a weight is refused.

Every (cell, seed) is one run directory,

    <root>/<task>/baseline/seed<k>/                 standard training (the task's baseline recipe)
    <root>/<task>/<family>_x<multiplier>/seed<k>/   e.g. grad_norm_x0.1, adversarial_x10
    <root>/<task>/<fixed family>_x1/seed<k>/        a family trained only as its recipe is (e.g.
                                                    WeightSparsity, whose strength is its density,
                                                    one recipe per density: no weight to scale)

holding the derived recipe (``study_recipe.yaml``, what ``interp-train fit --config`` was given)
next to what fit writes (config.yaml, checkpoints/, metrics.json). A run counts as done when its
metrics.json exists (fit writes it atomically at the very end), so a rerun skips it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

BASELINE = "baseline"
DEFAULT_MULTIPLIERS = (0.1, 1.0, 10.0)
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
RECIPE_FILE = "study_recipe.yaml"  # the derived recipe, written into the run directory
SCHEDULE_LEVELS = ("value", "start", "final")  # the weight levels of interp_train.schedules


@dataclass(frozen=True)
class Family:
    """A regularizer family: its recipe file (stem) and the ``init_args`` entry that is its strength."""

    recipe: str
    strength: str = "weight"


@dataclass(frozen=True)
class TaskPlan:
    """One task of the study: a recipe folder, its standard-training recipe, the regularizer families.

    recipe: folder under the repository root (e.g. "recipes/digits"); baseline: the recipe file
    (stem) of standard training; families: {family name: recipe stem whose regularizer weights are
    scaled, or a ``Family`` naming another strength argument}; multipliers: the strengths, as
    multiples of the recipe's; fixed: {family name: recipe stem} trained only as the recipe is
    (cell ``<family>_x1``, not swept: e.g. WeightSparsity, whose strength is its density); extra:
    CLI overrides for every run of the task; llc: measure the LLC in compare; measure:
    ``MeasureOptions`` overrides for this task.
    """

    recipe: str
    baseline: str
    families: Mapping[str, str | Family]
    multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS
    extra: tuple[str, ...] = ()
    llc: bool = False
    measure: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if BASELINE in self.families or BASELINE in self.fixed:
            raise ValueError(f"a family may not be called {BASELINE!r} (that is the standard-training cell)")
        both = sorted(set(self.families) & set(self.fixed))
        if both:
            raise ValueError(f"families {both} are both swept and fixed; name each once")
        for m in self.multipliers:
            check_multiplier(m)

    def recipe_path(self, root: Path, stem: str) -> Path:
        return Path(root) / self.recipe / f"{stem}.yaml"

    def family(self, name: str) -> Family:
        spec = self.families[name]
        return spec if isinstance(spec, Family) else Family(spec)


def check_multiplier(m: float) -> float:
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        raise ValueError(f"a strength multiplier must be a finite number > 0, got {m!r}")
    return float(m)


def multiplier_label(m: float) -> str:
    """"x0.1", "x1", "x10", "x0.03" — shortest exact decimal (%g), the form used in directory names."""
    return f"x{check_multiplier(m):g}"


def variant_name(family: str, multiplier: float) -> str:
    """The cell's name: "<family>_x<multiplier>" (e.g. grad_norm_x0.1)."""
    return f"{family}_{multiplier_label(multiplier)}"


def parse_variant(name: str) -> tuple[str, float | None]:
    """(family, multiplier) of a cell name; (baseline, None) for the baseline."""
    if name == BASELINE:
        return BASELINE, None
    family, sep, label = name.rpartition("_x")
    if not sep or not family:
        raise ValueError(f"{name!r} is not a study cell name (expected 'baseline' or '<family>_x<multiplier>')")
    return family, float(label)


def run_dir(root: Path, task: str, variant: str, seed: int) -> Path:
    return Path(root) / task / variant / f"seed{seed}"


@dataclass(frozen=True)
class Cell:
    """One (variant, seed) of a task: which recipe, at which strength, where it goes."""

    task: str
    variant: str
    family: str
    multiplier: float | None  # None: the recipe as it is (the baseline, a fixed family)
    recipe: Path
    seed: int
    directory: Path
    strength: str = "weight"  # the init_args entry the multiplier scales

    @property
    def done(self) -> bool:
        return (self.directory / "metrics.json").is_file()


def cells(plan: TaskPlan, task: str, seeds: Sequence[int], root: Path, repo: Path,
          families: Sequence[str] | None = None, multipliers: Sequence[float] | None = None) -> Iterator[Cell]:
    """The baseline and every (family, multiplier) cell of ``plan`` for each seed, in that order
    (seed-major within a cell, so a partial run has whole cells). ``families`` / ``multipliers``
    select a part (None: the plan's); an unknown family is an error naming the allowed ones. Fixed
    families (``plan.fixed``) come last, one cell ``<family>_x1`` each, whatever ``multipliers`` says."""
    chosen = [*plan.families, *plan.fixed] if families is None else list(families)
    unknown = [f for f in chosen if f not in plan.families and f not in plan.fixed and f != BASELINE]
    if unknown:
        raise ValueError(f"task {task!r} has no family {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join([BASELINE, *plan.families, *plan.fixed])}")
    mults = [check_multiplier(m) for m in (plan.multipliers if multipliers is None else multipliers)]
    if families is None or BASELINE in chosen:
        for s in seeds:
            yield Cell(task, BASELINE, BASELINE, None, plan.recipe_path(repo, plan.baseline), s,
                       run_dir(root, task, BASELINE, s))
    for family in chosen:
        if family == BASELINE or family in plan.fixed:
            continue
        for m in mults:
            name, spec = variant_name(family, m), plan.family(family)
            for s in seeds:
                yield Cell(task, name, family, m, plan.recipe_path(repo, spec.recipe), s, run_dir(root, task, name, s),
                           spec.strength)
    for family in chosen:
        if family in plan.fixed:
            name = variant_name(family, 1.0)
            for s in seeds:
                yield Cell(task, name, family, None, plan.recipe_path(repo, plan.fixed[family]), s,
                           run_dir(root, task, name, s))


def scale_weight(weight: Any, multiplier: float, where: str = "weight") -> Any:
    """``multiplier`` × a regularizer weight as written in a recipe: a number, or a schedule
    ``{class_path, init_args: {value, [start], [final], ...}}`` whose levels are all scaled."""
    if isinstance(weight, bool):
        raise ValueError(f"{where}: a weight must be a number or a schedule, got {weight!r}")
    if isinstance(weight, (int, float)):
        return float(weight) * multiplier
    if isinstance(weight, Mapping) and isinstance(weight.get("init_args"), Mapping):
        args = dict(weight["init_args"])
        levels = [k for k in SCHEDULE_LEVELS if k in args]
        if "value" not in levels:
            raise ValueError(f"{where}: schedule {weight.get('class_path')!r} has no 'value' to scale "
                             f"(init_args: {sorted(args)})")
        for k in levels:
            args[k] = scale_weight(args[k], multiplier, f"{where}.init_args.{k}")
        return {**weight, "init_args": args}
    raise ValueError(f"{where}: a weight must be a number or a schedule with init_args.value, got {weight!r}")


def replaces_task_loss(regularizer: Mapping[str, Any]) -> bool:
    """Whether the recipe's regularizer (class_path + init_args) trains on its own loss instead of
    the task loss — asked of the regularizer itself (``replaces_task_loss``, built from its arguments)."""
    import importlib

    module, _, cls = str(regularizer.get("class_path", "")).rpartition(".")
    try:
        built = getattr(importlib.import_module(module), cls)(**dict(regularizer.get("init_args") or {}))
    except Exception:  # not buildable on its own (e.g. a schedule dict as weight): read the argument
        return bool((regularizer.get("init_args") or {}).get("replace_task_loss", False))
    return bool(getattr(built, "replaces_task_loss", False))


def scaled_recipe(recipe: Mapping[str, Any], multiplier: float, name: str = "recipe", strength: str = "weight") -> dict:
    """A copy of the recipe (parsed YAML) with each regularizer's ``strength`` argument × ``multiplier``.

    strength "weight": every regularizer's weight (a regularizer without one has the class default
    1.0, made explicit); refused for a regularizer that replaces the task loss (module docstring).
    Another name (e.g. "epsilon"): every regularizer that sets it in the recipe; at least one must.
    A recipe without regularizers is an error: there is nothing to scale."""
    multiplier = check_multiplier(multiplier)
    out = copy.deepcopy(dict(recipe))
    regs = ((out.get("model") or {}).get("regularizers")) or []
    if not regs:
        raise ValueError(f"{name}: no model.regularizers to scale (a family needs a recipe with regularizers)")
    scaled = 0
    for i, reg in enumerate(regs):
        args = reg.setdefault("init_args", {})
        if strength == "weight":
            if replaces_task_loss(reg):
                raise ValueError(f"{name}: regularizer {i} ({reg.get('class_path')}) replaces the task loss, so its "
                                 "weight only rescales the loss (Adam ignores that); sweep another argument, "
                                 "e.g. Family(recipe, 'epsilon')")
            args["weight"] = scale_weight(args.get("weight", 1.0), multiplier, f"{name}: regularizer {i} weight")
            scaled += 1
        elif strength in args:
            args[strength] = scale_weight(args[strength], multiplier, f"{name}: regularizer {i} {strength}")
            scaled += 1
    if not scaled:
        raise ValueError(f"{name}: no regularizer sets {strength!r} in its init_args (write the recipe's value "
                         "explicitly to sweep it)")
    return out


def derived_recipe(cell: Cell) -> dict:
    """The recipe this cell trains: the baseline recipe as it is, a family's with scaled weights."""
    import yaml

    recipe = yaml.safe_load(cell.recipe.read_text()) or {}
    return recipe if cell.multiplier is None else scaled_recipe(recipe, cell.multiplier, str(cell.recipe), cell.strength)


def write_derived_recipe(cell: Cell) -> Path:
    """Writes ``derived_recipe(cell)`` to ``<run dir>/study_recipe.yaml`` (atomically); returns the path."""
    import yaml

    from interp_train.io import write_atomic

    path = cell.directory / RECIPE_FILE
    header = (f"# study cell {cell.variant} seed{cell.seed}: {cell.recipe.name}"
              + ("" if cell.multiplier is None else f" with the regularizers' {cell.strength} x{cell.multiplier:g}")
              + "\n")
    write_atomic(path, header + yaml.safe_dump(derived_recipe(cell), sort_keys=False))
    return path
