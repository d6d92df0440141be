"""The ablation specs of experiments/*.py: found, loaded and looked up by name, without torch, so
that the CLI refuses a bad ablation, preset or variant name before it loads the training code.
Each spec names its variants, its baseline and a token budget per preset (moebench.presets)."""
from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from moebench.config import Ablation, Preset
from moebench.errors import UserError
from moebench.presets import rule_of

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Spec:
    ablation: Ablation
    path: Path
    preset_variants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    preset_baseline: dict[str, str] = field(default_factory=dict)
    x_axis: str = ""                                  # "", "n_expert", "ratio" or "placement"

    @property
    def name(self) -> str:
        return self.ablation.name

    def variants(self, preset: str) -> tuple[str, ...]:
        return self.preset_variants.get(preset, self.ablation.variants)

    def baseline(self, preset: str) -> str:
        return self.preset_baseline.get(preset, self.ablation.baseline)

    def preset(self, name: str) -> Preset:
        if name not in self.ablation.presets:
            shown = [p for p in self.ablation.presets if not rule_of(p).hidden]
            close = difflib.get_close_matches(name, shown, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"ablation '{self.name}' has no preset '{name}'{hint} (presets: {', '.join(shown)})")
        return self.ablation.presets[name]


def experiment_dirs() -> list[Path]:
    """experiments/ next to the package (a source checkout), the copy an installed wheel carries
    (moebench/_experiments), then ./experiments."""
    dirs = [REPO_ROOT / "experiments", Path(__file__).parent / "_experiments", Path.cwd() / "experiments"]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


_SPECS: dict[str, Spec] | None = None


def load_specs() -> dict[str, Spec]:
    global _SPECS
    if _SPECS is not None:
        return _SPECS
    specs: dict[str, Spec] = {}
    for folder in experiment_dirs():
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            module_name = f"moebench_experiments.{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            abl = getattr(module, "ABLATION", None)
            if not isinstance(abl, Ablation):
                raise UserError(f"{path} defines no ABLATION = Ablation(...)")
            if abl.name in specs:
                continue                                   # the checkout's copy wins over ./experiments
            specs[abl.name] = Spec(abl, path, dict(getattr(module, "PRESET_VARIANTS", {})),
                                   dict(getattr(module, "PRESET_BASELINE", {})), getattr(module, "X_AXIS", ""))
    _SPECS = specs
    return specs


def get_spec(name: str) -> Spec:
    specs = load_specs()
    if name not in specs:
        close = difflib.get_close_matches(name, specs, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        known = ", ".join(specs) or f"none found in {REPO_ROOT / 'experiments'} or ./experiments"
        raise UserError(f"unknown ablation '{name}'{hint} (ablations: {known})")
    return specs[name]


def get_ablation(name: str) -> Ablation:
    """The ablation named `name`; a bad name suggests close matches."""
    return get_spec(name).ablation


def resolve_variants(spec: Spec, preset: str, only: list[str] | None) -> list[str]:
    names = list(spec.variants(preset))
    if not only:
        return names
    picked = []
    for want in only:
        base = want.removesuffix("@tiny")
        if base not in names:
            close = difflib.get_close_matches(base, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"'{want}' is not a variant of ablation '{spec.name}' at preset {preset}{hint}")
        picked.append(base)
    return [n for n in names if n in picked]
