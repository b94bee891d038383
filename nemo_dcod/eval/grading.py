"""Is a predicted final answer equivalent to the reference? math-verify, with a timeout, and a
string fallback.

:class:`Grader` answers in three steps, cheapest first:

1. no answer extracted -> wrong (``no_answer``);
2. equal after :func:`~nemo_dcod.eval.answers.normalize_answer` -> right (``string``): this also
   catches text answers no parser reads (``\\text{Evelyn}``, ``(C)``);
3. math-verify (Hugging Face's maintained grader: LaTeX -> SymPy, then numeric, symbolic, set,
   interval, matrix and equation comparison) on both answers written as ``$...$``
   (``math_verify``); a comparison that runs past the timeout is wrong (``timeout``).

Why a timeout, and why two ways to enforce it: SymPy can spend minutes on an answer like
``2^{2^{2^{100}}}``. math-verify bounds each parse and comparison with ``signal.alarm``, which only
works in the main thread of the main interpreter (``timeout_backend=signal``). Anywhere else
(a thread pool, a web server), grading goes to a child process that runs math-verify in *its*
main thread; the parent waits with a hard limit and kills and restarts the child if even that
passes (a long C-level call that no signal interrupts) (``timeout_backend=process``). ``auto``
picks ``signal`` in the main thread, ``process`` elsewhere.

Without math-verify installed (``pip install -e '.[eval]'``), ``grader=auto`` grades with step 2
alone and says so once.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import threading
import warnings
from dataclasses import dataclass
from itertools import product
from multiprocessing.connection import Connection
from typing import Any, Literal

from nemo_dcod.eval.answers import answers_match, strip_math_delimiters

__all__ = [
    "GradeMethod",
    "Grader",
    "GraderName",
    "TimeoutBackend",
    "Verdict",
    "answers_equal",
    "math_verify_available",
]

GraderName = Literal["auto", "math_verify", "string"]
TimeoutBackend = Literal["auto", "signal", "process"]
GradeMethod = Literal["no_answer", "string", "math_verify", "timeout"]

INSTALL_HINT = "install it with: pip install -e '.[eval]' (or pip install 'math-verify[antlr4_9_3]')"
_START_TIMEOUT_S = 120.0  # a child process imports SymPy before its first answer
_CACHE_LIMIT = 100_000


@dataclass(frozen=True)
class Verdict:
    """A grade and how it was reached."""

    correct: bool
    method: GradeMethod


def math_verify_available() -> bool:
    """Whether the ``math_verify`` package can be imported."""
    return importlib.util.find_spec("math_verify") is not None


def _as_latex(answer: str) -> str:
    """An extracted answer in the form math-verify's LaTeX extractor reads: ``$...$``."""
    return f"${strip_math_delimiters(answer.strip())}$"


def math_verify_equal(predicted: str, reference: str, timeout: int) -> bool | None:
    """math-verify's verdict on two extracted answers; None if a step ran past ``timeout`` s.

    Must run in the main thread (math-verify's timeouts are ``signal.alarm``). Parse or comparison
    errors count as "not equal". Every pair of the parses is compared (math-verify returns a
    SymPy object and the matched string for each side), as ``math_verify.verify`` does, but a
    timeout is reported instead of read as False.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold = parse(_as_latex(reference), parsing_timeout=timeout, raise_on_error=True)
        pred = parse(_as_latex(predicted), parsing_timeout=timeout, raise_on_error=True)
    except TimeoutException:
        return None
    except Exception:
        return False
    timed_out = False
    for g, p in product(gold, pred):
        try:
            if verify(g, p, timeout_seconds=timeout, raise_on_error=True):
                return True
        except TimeoutException:
            timed_out = True
        except Exception:  # SymPy raises many types on odd inputs: not equal
            continue
    return None if timed_out else False


def _serve(conn: Connection, timeout: int) -> None:
    """The grading child process: answer ``(predicted, reference)`` requests until told to stop."""
    import math_verify  # noqa: F401  (imported before "ready": the parent's clock starts after)

    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        conn.send(math_verify_equal(request[0], request[1], timeout))


class _GradingProcess:
    """A spawned child that grades one pair at a time; killed and restarted when it hangs."""

    def __init__(self, timeout: int) -> None:
        self.timeout = timeout
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        ctx = multiprocessing.get_context("spawn")  # fork would copy a parent's threads (torch's)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, self.timeout), daemon=True, name="nemo-dcod-grader")
        proc.start()
        child.close()
        if not parent.poll(_START_TIMEOUT_S):
            proc.kill()
            raise RuntimeError(f"the grading process did not start within {_START_TIMEOUT_S:.0f} s")
        parent.recv()
        self._proc, self._conn = proc, parent
        return parent

    def equal(self, predicted: str, reference: str) -> bool | None:
        conn = self._conn
        if conn is None or not self._proc.is_alive():
            conn = self._start()
        conn.send((predicted, reference))
        # The child's own alarms bound each of its (at most 2 + 4) steps; this limit only catches
        # what a signal cannot interrupt.
        if conn.poll(6 * self.timeout + 5):
            try:
                result: bool | None = conn.recv()
                return result
            except EOFError:  # the child died (out of memory, say)
                pass
        self.close(kill=True)
        return None

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if not kill and self._conn is not None:
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None


class Grader:
    """Grades a predicted final answer against a reference (see the module docstring).

    Args:
        name: math_verify (error if not installed), string (normalised strings only), or auto
            (math_verify when installed, else string with a warning).
        timeout: seconds per math-verify parse or comparison (an integer: ``signal.alarm``).
        timeout_backend: how the timeout is enforced: signal, process, or auto (signal in the main
            thread, process elsewhere).

    Usable from several threads (the process backend serialises requests). Close it (or use it
    as a context manager) to stop a grading child process.
    """

    def __init__(self, name: str = "auto", timeout: int = 5, timeout_backend: str = "auto") -> None:
        if name not in ("auto", "math_verify", "string"):
            raise ValueError(f"grader={name!r}: must be one of auto, math_verify, string.")
        if timeout_backend not in ("auto", "signal", "process"):
            raise ValueError(f"timeout_backend={timeout_backend!r}: must be one of auto, signal, process.")
        if not isinstance(timeout, int) or timeout < 1:
            raise ValueError(f"timeout={timeout!r}: must be a whole number of seconds >= 1.")
        available = math_verify_available()
        if name == "math_verify" and not available:
            raise ImportError(
                f"grader=math_verify: the math-verify package is not installed; {INSTALL_HINT}."
            )
        if name == "auto":
            name = "math_verify" if available else "string"
            if not available:
                warnings.warn(
                    f"math-verify is not installed: answers are graded by normalised string only; "
                    f"{INSTALL_HINT}.",
                    stacklevel=2,
                )
        self.name: Literal["math_verify", "string"] = "math_verify" if name == "math_verify" else "string"
        self.timeout = timeout
        self.timeout_backend = timeout_backend
        self._lock = threading.Lock()
        self._process: _GradingProcess | None = None
        self._cache: dict[tuple[str, str], bool | None] = {}

    def grade(self, predicted: str | None, reference: str) -> Verdict:
        """The verdict on ``predicted`` (None: nothing was extracted) against ``reference``."""
        if predicted is None or not predicted.strip():
            return Verdict(False, "no_answer")
        if answers_match(predicted, reference):
            return Verdict(True, "string")
        if self.name == "string":
            return Verdict(False, "string")
        key = (predicted, reference)
        if key in self._cache:
            result = self._cache[key]
        else:
            result = self._math_verify(predicted, reference)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = result
        if result is None:
            return Verdict(False, "timeout")
        return Verdict(result, "math_verify")

    def _math_verify(self, predicted: str, reference: str) -> bool | None:
        in_main = threading.current_thread() is threading.main_thread()
        backend = self.timeout_backend
        if backend == "auto":
            backend = "signal" if in_main and os.name == "posix" else "process"
        if backend == "signal":
            if not in_main:
                raise RuntimeError(
                    "timeout_backend=signal: math-verify's timeout (signal.alarm) works only in the "
                    "main thread; grade from the main thread or set timeout_backend=process (or auto)."
                )
            return math_verify_equal(predicted, reference, self.timeout)
        with self._lock:
            if self._process is None:
                self._process = _GradingProcess(self.timeout)
            return self._process.equal(predicted, reference)

    def close(self) -> None:
        """Stop the grading child process, if one was started."""
        with self._lock:
            if self._process is not None:
                self._process.close()
                self._process = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DEFAULT: Grader | None = None


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers are equivalent, by a shared default :class:`Grader` (auto, 5 s).

    What ``prepare``'s correctness filter uses. With math-verify installed it accepts equivalent
    forms (``0.5`` and ``\\frac{1}{2}``); without, only equal normalised strings.
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Grader("auto")
    return _DEFAULT.grade(predicted, reference).correct
