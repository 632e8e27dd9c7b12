"""The LayerSkip recipe as one dataclass, the published presets, and the per-step schedule
(drop probabilities and normalised exit weights) that the trainer applies."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace

from .curriculum import CURRICULA, enabled_exits
from .early_exit_loss import EXIT_SCALES, exit_scales, normalized_scales
from .errors import ConfigError
from .layer_dropout import DEPTH_SCALES, TIME_SCALES, drop_probabilities


@dataclass(frozen=True)
class Recipe:
    layer_dropout_max: float = 0.1          # p_max; 0 turns layer dropout off
    layer_dropout_scale: str = "exp"        # D(l): exp | linear | uniform
    layer_dropout_time_scale: str = "constant"  # S(t): constant | exp
    early_exit_scale: float = 0.1           # e_scale; 0 turns the early-exit loss off
    early_exit_scale_type: str = "sum"      # e(l): sum | linear | uniform
    curriculum: str = "rotational"          # C(t, l): rotational | gradual | none
    rotation_period: int = 8                # R for the rotational curriculum
    # Exits the early-exit loss may train, as exit_layer values (layers run); the last layer
    # is always trained. 1..0 = every exit (the paper); a window such as 16..26 trains only
    # the exits a draft would use, and reads the 49k-entry head out less often.
    min_exit_layer: int = 1
    max_exit_layer: int = 0                 # 0 = up to the last layer

    def validate(self) -> "Recipe":
        if not 0.0 <= self.layer_dropout_max < 1.0:
            raise ConfigError(f"--layer-dropout-max must be in [0, 1), got {self.layer_dropout_max}")
        if self.early_exit_scale < 0:
            raise ConfigError(f"--early-exit-scale must be >= 0, got {self.early_exit_scale}")
        if self.rotation_period < 1:
            raise ConfigError(f"--rotation-period must be >= 1, got {self.rotation_period}")
        if self.min_exit_layer < 1:
            raise ConfigError(f"--min-exit-layer must be >= 1, got {self.min_exit_layer}")
        if self.max_exit_layer and self.max_exit_layer < self.min_exit_layer:
            raise ConfigError(f"--max-exit-layer must be 0 (no cap) or >= --min-exit-layer "
                              f"{self.min_exit_layer}, got {self.max_exit_layer}")
        for flag, value, allowed in (
                ("--layer-dropout-scale", self.layer_dropout_scale, DEPTH_SCALES),
                ("--layer-dropout-time-scale", self.layer_dropout_time_scale, TIME_SCALES),
                ("--early-exit-scale-type", self.early_exit_scale_type, EXIT_SCALES),
                ("--curriculum", self.curriculum, CURRICULA)):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {'|'.join(allowed)}, got {value!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def check_depth(self, num_layers: int) -> "Recipe":
        """The exit window must hold at least one exit below the last layer."""
        if self.min_exit_layer >= num_layers:
            raise ConfigError(f"--min-exit-layer must be below the model's {num_layers} layers, "
                              f"got {self.min_exit_layer}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validate()


# Settings from the LayerSkip paper (Elhoushi et al., 2024), Section 5.
PRESETS: dict[str, Recipe] = {
    "continual-pretraining": Recipe(0.1, "exp", "constant", 0.1, "sum", "rotational", 8),
    "pretraining": Recipe(0.1, "exp", "exp", 0.2, "sum", "rotational", 8),
    "code-finetuning": Recipe(0.1, "exp", "constant", 1.0, "sum", "rotational", 16),
    "task-finetuning": Recipe(0.2, "exp", "constant", 1.0, "sum", "gradual", 8),
    # Plain training: no layer dropout, no early-exit loss (the baseline).
    "none": Recipe(0.0, "exp", "constant", 0.0, "sum", "none", 1),
}


@dataclass(frozen=True)
class StepPlan:
    """What the recipe does at one step: drop probability per layer and exit weights."""
    drop_probs: list[float]     # p(l, t) per layer index
    exit_weights: list[float]   # e~(t, l) per layer index; zeros are not computed


def in_window(enabled: list[bool], min_exit: int, max_exit: int) -> list[bool]:
    """C(t, l) restricted to exits min_exit <= l + 1 <= max_exit (0 = no cap); the last
    layer stays on."""
    top = max_exit or len(enabled)
    return [on and min_exit <= l + 1 <= top or l == len(enabled) - 1
            for l, on in enumerate(enabled)]


def step_plan(recipe: Recipe, step: int, total_steps: int, num_layers: int) -> StepPlan:
    probs = drop_probabilities(num_layers, step, total_steps, recipe.layer_dropout_max,
                               recipe.layer_dropout_scale, recipe.layer_dropout_time_scale)
    enabled = in_window(enabled_exits(recipe.curriculum, step, num_layers, total_steps,
                                      recipe.rotation_period),
                        recipe.min_exit_layer, recipe.max_exit_layer)
    scales = exit_scales(num_layers, recipe.early_exit_scale, recipe.early_exit_scale_type)
    return StepPlan(probs, normalized_scales(scales, enabled))


# ----- command line ------------------------------------------------------------------

def add_recipe_flags(parser: argparse.ArgumentParser, default_preset: str) -> None:
    g = parser.add_argument_group("LayerSkip recipe (flags override the preset)")
    g.add_argument("--preset", default=default_preset,
                   help=f"starting point: {', '.join(PRESETS)} (default {default_preset})")
    g.add_argument("--layer-dropout-max", type=float, metavar="P",
                   help="p_max, maximum per-layer drop probability in [0, 1); 0 = off")
    g.add_argument("--layer-dropout-scale", metavar="exp|linear|uniform",
                   help="D(l), how the drop rate grows with depth")
    g.add_argument("--layer-dropout-time-scale", metavar="constant|exp",
                   help="S(t), constant for fine-tuning, exp ramps up for pretraining")
    g.add_argument("--early-exit-scale", type=float, metavar="E",
                   help="e_scale, weight of the early-exit losses, >= 0; 0 = off")
    g.add_argument("--early-exit-scale-type", metavar="sum|linear|uniform",
                   help="e(l), how exit weights grow with depth (sum = paper)")
    g.add_argument("--curriculum", metavar="rotational|gradual|none",
                   help="C(t, l), which exits are trained at each step")
    g.add_argument("--rotation-period", type=int, metavar="R",
                   help="rotational curriculum: every R-th exit is on, R >= 1")
    g.add_argument("--min-exit-layer", type=int, metavar="E",
                   help="train early exits from exit_layer E on (default 1: all)")
    g.add_argument("--max-exit-layer", type=int, metavar="E",
                   help="train early exits up to exit_layer E (default 0: all); the last "
                        "layer is always trained")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    if args.preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {'|'.join(PRESETS)}, got {args.preset!r}")
    overrides = {f.name: getattr(args, f.name) for f in fields(Recipe)
                 if getattr(args, f.name, None) is not None}
    return replace(PRESETS[args.preset], **overrides).validate()
