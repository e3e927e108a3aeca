"""Interrupt flag and cache calls with ComfyUI's semantics (``comfy/model_management.py``)."""

import threading

_lock = threading.Lock()
interrupt_processing = False
cache_cleared = 0


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value=True):
    global interrupt_processing
    with _lock:
        interrupt_processing = value


def processing_interrupted():
    with _lock:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with _lock:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def soft_empty_cache(force=False):
    global cache_cleared
    cache_cleared += 1
