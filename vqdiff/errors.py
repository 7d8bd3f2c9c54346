"""The error that `vqdiff.registry` and `vqdiff.checkpoint` both raise.

It lives here, below both, so that imports run one way: checkpoint -> registry -> the model modules.
Callers catch it as `vqdiff.checkpoint.CheckpointError` (the same class).
"""


class CheckpointError(Exception):
    """A checkpoint folder that is missing, corrupt or does not fit the model, or an unknown model
    kind; the message is one line."""
