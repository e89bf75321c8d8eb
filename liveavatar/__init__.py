"""liveavatar: real-time, unlimited-length talking-avatar video from one image, speech and a prompt."""

__version__ = "0.1.0"
