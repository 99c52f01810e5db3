"""Errors a user can cause and fix. Front ends print them as one line; nothing else is expected."""


class SPAError(Exception):
    """Base class: a problem with the user's input, files or configuration, with the fix named."""


class InputError(SPAError):
    """An image, prompt, choice or argument that cannot be used as given."""


class CheckpointError(SPAError):
    """A model checkpoint that is missing, corrupt, or does not fit the requested architecture."""


class ProfileError(SPAError):
    """A preference profile that is missing, corrupt, or belongs to another model."""


class DataError(SPAError):
    """A dataset folder or file that does not follow the expected layout."""
