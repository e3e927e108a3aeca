"""The Gradio page, one builder per panel or tab, over ``rlr_app.form`` and ``rlr_app.render``.

Each module builds its components inside the layout context it is called in (``build``) and registers
its events once every component exists (``wire``); ``gradio_app.build_ui`` lays them out. These modules
import Gradio, so only ``build_ui`` imports them: the rest of the app works with Gradio absent.
"""

from .common import Page

__all__ = ["Page"]
