"""Configuration: TOML loading, option parsing and problems that name file and key."""

from harmony.config.errors import ConfigErrors, OptionError, Problem
from harmony.config.loader import load_config
from harmony.config.options import Options

__all__ = ["ConfigErrors", "OptionError", "Problem", "load_config", "Options"]
