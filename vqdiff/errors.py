"""The error of a file vqdiff cannot use, raised from the ground floor up.

`vqdiff.io` (a missing or corrupt JSON or tensor file), `vqdiff.registry` (an unknown model kind)
and `vqdiff.checkpoint` (a folder that does not fit its model) all raise it, so it lives below all
three: imports run one way, checkpoint -> registry -> the model modules, and everything -> io.
"""


class CheckpointError(Exception):
    """A checkpoint or data file that is missing, corrupt or does not fit the model, or an unknown
    model kind; the message is one line."""
