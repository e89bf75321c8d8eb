"""User-facing errors: each carries a one-line message that names the file and what was expected."""


class LiveAvatarError(Exception):
    """Base class for errors that are reported to the user without a traceback."""


class CheckpointError(LiveAvatarError):
    """A checkpoint file or folder is missing, corrupt, or does not match the expected layout."""


class InputError(LiveAvatarError):
    """A user input (image, audio, prompt, option) is missing or invalid."""
