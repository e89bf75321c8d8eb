"""User-facing errors: each carries a one-line message that names the file and what was expected."""


class LiveAvatarError(Exception):
    """Base class for errors that are reported to the user without a traceback."""


class CheckpointError(LiveAvatarError):
    """A checkpoint file or folder is missing, corrupt, or does not match the expected layout."""


class InputError(LiveAvatarError):
    """A user input (image, audio, prompt, option) is missing or invalid."""


class JobStopped(LiveAvatarError):
    """A generation was asked to stop; what was generated is kept and resumable."""


class OutOfMemory(LiveAvatarError):
    """The GPU ran out of memory; the message names the remedies."""


class DiskFull(LiveAvatarError):
    """The output disk filled up; the part written so far is kept."""
