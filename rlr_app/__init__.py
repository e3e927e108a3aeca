"""The app layer between the backend and Gradio: form checking and rendering, with no UI library.

``gradio_app.py`` (the page) imports it; it imports only ``rlr_backend``.
"""
