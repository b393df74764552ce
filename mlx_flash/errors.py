"""Every error a user of mlx_flash can see, in one place (the bottom layer): each says in one
line what is wrong, and the command lines print it as `error: ...` with no traceback.

They live here rather than beside the code that raises them so that any layer can raise or
catch them without importing a layer above it (a module run as `python -m mlx_flash.convert`
is also imported a second time as `mlx_flash.convert`: an error class defined in it would be
two different classes)."""


class BundleError(Exception):
    """A bundle is missing, incomplete, altered, or of an unsupported version."""


class UnsupportedModel(ValueError):
    """The model's architecture or configuration is not one we can run (a ValueError: the
    command lines report it as one)."""


class SourceError(Exception):
    """A model source is missing, unreadable, or of a kind we do not convert."""


class ConversionError(Exception):
    """The source's tensors do not match what its architecture needs."""


class BudgetError(ValueError):
    """The memory budget is below what the model needs at the least."""
