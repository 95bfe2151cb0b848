"""Typed configuration, parsed before torch is imported (nothing here imports it):

- `run`: the training run's `RunConfig` (model, adapter, data, train, eval) and `load_config`;
- `methods`: each adapter method's options class and `adapter_config_from`;
- `commands`: the options of the other commands (serve, merge, export, chat, eval, plan, ui),
  imported as `loratune.config.commands` (the flags module reads them);
- `base`: the section base, `ConfigError`, YAML files, `key=value` overrides, error messages.

Everything `run`, `methods` and `base` define is importable from `loratune.config` itself.
"""

from loratune.config.base import (apply_overrides, ConfigError, parse_override, read_yaml, set_key,
                                  USER_PATH, USER_URI, validate_config)
from loratune.config.methods import (AdaLoraConfig, adapter_config_from, adapter_options,
                                     AdapterConfig, add_adapter_options, BASE_INITS,
                                     BottleneckConfig, EvaOptions, forget_adapter_options,
                                     IA3Config, INIT_OPTIONS, LoftQOptions, LoHaConfig, LoKrConfig, LoraConfig,
                                     MoeLoraConfig, OFTConfig, PrefixConfig, PromptConfig,
                                     trains_layer_biases, VeraConfig)
from loratune.config.run import (BLOCK_RANGE, build_config, check_blocksize, DataConfig,
                                 DataSource,
                                 DEFAULT_BETA, DEFAULT_EPSILON, DEFAULT_MODEL, EvalConfig,
                                 load_config, ModelConfig, OBJECTIVES, PREFERENCE_OPTIONS,
                                 PreferenceConfig, QuantConfig, RewardSpec, RL_LOSSES, RlConfig,
                                 RunConfig, TrainConfig)
from loratune.config.run import (RUN_SECTIONS, SEARCH_OBJECTIVES, SearchConfig, SearchRange,
                                 SearchSpace, SearchTask, TARGET_SETS)

__all__ = ["RUN_SECTIONS", "SEARCH_OBJECTIVES", "SearchConfig", "SearchRange", "SearchSpace",
           "SearchTask", "TARGET_SETS",
           "AdaLoraConfig", "adapter_config_from", "adapter_options", "AdapterConfig",
           "add_adapter_options", "apply_overrides", "BASE_INITS", "BLOCK_RANGE",
           "BottleneckConfig", "build_config", "EvaOptions", "INIT_OPTIONS", "trains_layer_biases", "check_blocksize", "ConfigError", "DataConfig",
           "DataSource",
           "DEFAULT_BETA", "DEFAULT_EPSILON", "DEFAULT_MODEL", "EvalConfig",
           "forget_adapter_options", "IA3Config", "load_config", "LoftQOptions", "LoHaConfig",
           "LoKrConfig", "LoraConfig", "ModelConfig", "MoeLoraConfig", "OBJECTIVES", "OFTConfig",
           "parse_override", "PREFERENCE_OPTIONS", "PreferenceConfig", "PrefixConfig",
           "PromptConfig", "QuantConfig", "read_yaml", "RewardSpec", "RL_LOSSES", "RlConfig",
           "RunConfig", "set_key", "TrainConfig", "USER_PATH", "USER_URI", "validate_config",
           "VeraConfig"]
