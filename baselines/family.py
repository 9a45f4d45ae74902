"""The one registry of transformer families. Each family module registers itself at its end:

    register(Family(config=MyConfig, model=MyModel, sizes=(MyConfig(...), ...),
                    label="My family", style=("tab:cyan", "P")))

A fifth family is then one new module (its config dataclass with `shapes`/`from_hf`/`to_hf`, its
`TransformerLM` subclass, its named sizes, its plot label and style) plus its import in
`baselines/__init__.py`. Everything that lists families (config.json lookup, names, the loader,
the benchmark's legends) reads this registry. Nothing here imports the families.
"""
from dataclasses import dataclass, field
from typing import Dict, Tuple

DEFAULT_STYLE = ("gray", ".")


@dataclass(frozen=True)
class Family:
    config: type                    # the config dataclass; its model_type keys config.json
    model: type                     # the TransformerLM subclass built from (config, state dict)
    sizes: Tuple = ()               # configs of the released checkpoints, each with its name
    label: str = ""                 # legend label in the benchmark's plots
    style: Tuple[str, str] = DEFAULT_STYLE      # matplotlib (color, marker)
    aliases: Dict[str, str] = field(default_factory=dict)    # other names of sizes -> registered name

    @property
    def name(self):
        """The benchmark's family key ('pythia', 'opt', ...)."""
        return self.config.family

    @property
    def model_type(self):
        return self.config.model_type


FAMILIES: Dict[str, Family] = {}    # model_type -> Family
MODELS: Dict[str, object] = {}      # registered size name -> config
ALIASES: Dict[str, str] = {}        # other name -> registered size name


def register(family: Family) -> Family:
    """Add a family and its sizes; a model_type or size name taken by another family is an error."""
    mt = family.model_type
    if not mt or not family.name:
        raise ValueError(f"{family.config.__name__} needs the class attributes model_type and family")
    if mt in FAMILIES and FAMILIES[mt] is not family:
        raise ValueError(f"model_type {mt!r} is already registered by {FAMILIES[mt].model.__name__}")
    taken = [c.name for c in family.sizes if c.name in MODELS and MODELS[c.name].model_type != mt]
    if taken:
        raise ValueError(f"size names {taken} are already registered by another family")
    FAMILIES[mt] = family
    MODELS.update({c.name: c for c in family.sizes})
    ALIASES.update(family.aliases)
    return family


def unregister(model_type):
    """Remove a family and its sizes (tests)."""
    family = FAMILIES.pop(model_type)
    for c in family.sizes:
        MODELS.pop(c.name, None)
    for alias in family.aliases:
        ALIASES.pop(alias, None)


def by_name(name):
    """The Family whose benchmark key is `name` ('pythia'), or None."""
    return next((f for f in FAMILIES.values() if f.name == name), None)
