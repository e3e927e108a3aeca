"""``ProgressBar`` whose updates go through a hook that, like ComfyUI's server hook, raises on interrupt."""

from . import model_management

UPDATES: list = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        model_management.throw_exception_if_processing_interrupted()
        self.current = value
        UPDATES.append((self.node_id, value, total or self.total, preview is not None))
