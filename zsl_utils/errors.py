"""Errors a user can fix: each message names the thing at fault (file, parameter, profile) and the fix, in one line."""


class ZslError(Exception):
    """Base class: a problem with the user's input, data or environment."""


class AssetUnavailableError(ZslError):
    """A data asset (WordNet, demo photos, weights) is missing and cannot be fetched."""


class DataLayoutError(ZslError):
    """A dataset folder or file does not have the expected layout."""


class ParameterError(ZslError, ValueError):
    """A notebook/profile parameter is unknown, ill-typed or out of range."""


class StaleCacheError(ZslError):
    """A cache on disk was made by a different model, preprocessing or dataset."""
