"""One frozen, keyword-only dataclass tree for every zerolm run.

Precedence: CLI (`--data.val_fraction=0.1`) > TOML recipe (`--config x.toml`, or a bundled one by
name: `--config speedrun`) > defaults.
Unknown keys and ill-typed values raise ValueError naming the valid keys or the expected type.
Each stage receives only its own sub-config (`cfg.data`, `cfg.tokenizer`, ...).
The tree is in schema.py; building it is load.py, its range checks validate.py, writing it save.py.
"""

from zerolm.config.load import RECIPES, load_config, merge_dicts, parse_overrides, recipe_path
from zerolm.config.save import save_config, to_toml
from zerolm.config.schema import (
    AlignConfig,
    CalibConfig,
    ClassifyConfig,
    Config,
    DataConfig,
    DistConfig,
    InspectConfig,
    LoRAConfig,
    MLMConfig,
    ModelConfig,
    PoemsConfig,
    PruneConfig,
    QuantConfig,
    SampleConfig,
    Seq2SeqConfig,
    ServeConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
    TranslateConfig,
)
from zerolm.config.validate import validate

__all__ = [
    "RECIPES",
    "AlignConfig",
    "CalibConfig",
    "ClassifyConfig",
    "Config",
    "DataConfig",
    "DistConfig",
    "InspectConfig",
    "LoRAConfig",
    "MLMConfig",
    "ModelConfig",
    "PoemsConfig",
    "PruneConfig",
    "QuantConfig",
    "SFTConfig",
    "SampleConfig",
    "Seq2SeqConfig",
    "ServeConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TranslateConfig",
    "load_config",
    "merge_dicts",
    "parse_overrides",
    "recipe_path",
    "save_config",
    "to_toml",
    "validate",
]
