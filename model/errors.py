"""The exceptions of the product, shared by ``model`` and ``ml_backend``.

Every message names the thing that is wrong and what to do about it. Code raises the narrowest class;
request and job boundaries catch :class:`TaxomocoError` and record it.
"""

__all__ = ["BundleError", "ConfigError", "DataError", "ResourceError", "TaxomocoError", "TaxonomyError"]


class TaxomocoError(Exception):
    """Base of every error the product raises on purpose."""


class TaxonomyError(TaxomocoError, ValueError):
    """A taxonomy or a taxonomy path is invalid (unknown label, duplicate sibling, too few classes)."""


class DataError(TaxomocoError, ValueError):
    """Input data cannot be used: an empty folder, an unreadable image, too few labelled examples."""


class BundleError(TaxomocoError):
    """A model bundle is missing, partial, or does not match its manifest."""


class ConfigError(TaxomocoError, ValueError):
    """A setting or a Label Studio label config cannot be served."""


class ResourceError(TaxomocoError, RuntimeError):
    """The machine ran out of a resource (memory, disk) for the requested work."""
