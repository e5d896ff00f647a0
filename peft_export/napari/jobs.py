"""What the dock widget's long work and actions share: Cancel, the one-line error guard, the worker's progress
callback and the settings file (kept apart from the widget so that it stays readable)."""

from __future__ import annotations

import functools
import threading

from qtpy.QtCore import QSettings


class Cancelled(Exception):
    """Raised inside a worker's progress callback when the user pressed Cancel."""


def user_settings() -> QSettings:
    """Where the widget remembers the last model, cache and save folders (an ini file in the user's config dir)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "peft-export", "napari")


def guarded(what: str):
    """Run a widget action; any error becomes one notification line (None is returned)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:
                self.report(exc, what)
                return None

        return wrapper

    return deco


class Progress:
    """The callback a worker's library call gets: counts steps, shows them, stops the work on Cancel."""

    def __init__(self, widget, cancel: threading.Event):
        self.widget, self.cancel = widget, cancel
        self.worker = None  # napari asks running workers to quit when it closes (worker.quit())
        self.what, self.done, self.total = "", 0, 0

    def phase(self, what: str, total: int) -> None:
        self.what, self.done, self.total = what, 0, int(total)
        self.widget._show_progress(what, 0, self.total)

    def check(self, n: int = 1) -> None:
        if self.cancel.is_set() or (self.worker is not None and self.worker.abort_requested):
            raise Cancelled

    def __call__(self, n: int = 1) -> None:
        self.check()
        self.done += int(n)
        self.widget._show_progress(self.what, self.done, self.total)

    def tiles(self, k: int, n: int) -> None:
        """``Segmenter.on_tiles``: k more of the image's n tiles embedded."""
        if self.what != "embedding tiles" or self.total != n:
            self.phase("embedding tiles", n)
        self(k)
