"""Errors that carry a message for the user: what is wrong and what to do. The tools print them without a
traceback."""


class TokenPruneError(Exception):
    """Base class of the errors the tools report as one clear message."""


class ConfigError(TokenPruneError, ValueError):
    """A config names something that does not exist or holds an invalid value."""


class DatasetError(TokenPruneError, ValueError):
    """A dataset folder, image or annotation file is missing or malformed."""


class WeightsMismatchError(TokenPruneError, ValueError):
    """A weights file does not fit the model it is loaded into."""
