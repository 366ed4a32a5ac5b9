"""Closable blocking iterators over the engine's long-lived responses (events, logs),
and the one-line reasons for docker SDK failures.  Part of the engine adapter."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import docker.errors
import requests

from gearproxy.errors import EngineError
from gearproxy.log import get_logger

_log = get_logger("gearproxy.engine")
T = TypeVar("T")


def one_line(text: str) -> str:
    return " ".join(text.split())


def reason(exc: BaseException) -> str:
    """A short reason for an SDK / requests / socket failure: the innermost OS error if any."""
    if isinstance(exc, docker.errors.APIError):
        explanation = exc.explanation
        text = explanation.decode(errors="replace") if isinstance(explanation, bytes) else (
            explanation or str(exc))
        return one_line(str(text))
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            return one_line(cur.strerror)
        if isinstance(cur, (TimeoutError, requests.exceptions.Timeout)):
            return "timed out"
        todo.extend(a for a in cur.args if isinstance(a, BaseException))
        for nxt in (cur.__cause__, cur.__context__, getattr(cur, "reason", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return one_line(str(exc)) or type(exc).__name__


SDK_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException, requests.exceptions.RequestException, OSError)
#: A read racing a close may also see its file closed under it (ValueError).
STREAM_ERRORS: tuple[type[BaseException], ...] = (*SDK_ERRORS, ValueError)



class Stream(Generic[T]):
    """An iterator over an open engine response that any thread may `close()`.

    Closing ends the iteration quietly.  A stream the engine ends on its own
    (engine restarted, connection lost) raises `EngineError`, so a watcher
    knows to reconnect (with `since=` the last event's time).  `close()` only
    shuts the socket down while another thread reads; the reader then releases
    the response, so no thread closes a file another one is reading.
    """

    def __init__(self, raw: Any, parse: Callable[[Any], T | None], what: str,
                 stop: threading.Event | None = None, *, ends: bool = False) -> None:
        self._raw = raw
        self._parse = parse
        self._what = what
        self._ends = ends
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._reading = False
        self._released = False
        if stop is not None:
            threading.Thread(target=self._watch, args=(stop,), daemon=True,
                             name=f"gearproxy-stop-{what}").start()

    def _watch(self, stop: threading.Event) -> None:
        # Poll both events so this thread ends with the stream even if `stop` never fires.
        while not self._closed.is_set():
            if stop.wait(0.1):
                self.close()
                return

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        while True:
            item = self._read()
            parsed = self._parse(item)
            if parsed is not None:
                return parsed

    def _read(self) -> Any:
        with self._lock:
            if self._closed.is_set():
                self._release()
                raise StopIteration
            self._reading = True
        try:
            return next(self._raw)
        except StopIteration:
            if self._closed.is_set() or self._ends:
                self._closed.set()
                raise
            self._closed.set()
            raise EngineError(f"the Docker engine ended the {self._what} stream "
                              "(engine restarted?): reconnect") from None
        except STREAM_ERRORS as exc:
            if self._closed.is_set():
                raise StopIteration from None
            self._closed.set()
            raise EngineError(f"the {self._what} stream failed: {reason(exc)}") from None
        finally:
            with self._lock:
                self._reading = False
                if self._closed.is_set():
                    self._release()

    def _release(self) -> None:
        """Close the response (and so its socket); called with the lock held, by one thread."""
        if self._released:
            return
        self._released = True
        response = getattr(self._raw, "_response", None)
        try:
            if response is not None:
                response.close()
        except Exception:  # already gone: releasing is best effort
            _log.debug("stream_release_failed", stream=self._what)

    def close(self) -> None:
        """End the stream; safe from any thread, and more than once."""
        with self._lock:
            if self._closed.is_set() and self._released:
                return
            self._closed.set()
            reading = self._reading
            if not reading:
                self._release()
        if reading:
            try:  # wake the reader: shut the socket down under it
                self._raw.close()
            except Exception:  # the socket may already be gone: closing is best effort
                _log.debug("stream_close_failed", stream=self._what)

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
