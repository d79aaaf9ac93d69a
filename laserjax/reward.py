"""The verifier reward r_v (LASER_SPEC section 6); `laserjax.commands.grade` is its command.

r_v = 1 when the last `\\boxed{...}` of a response is mathematically equivalent to the reference
answer, else 0. Equivalence is math-verify's, called the way the reference code calls it:
`verify(parse("\\boxed{gold}"), parse("\\boxed{pred}"))`. The training format gate of the reference
code (exactly one boxed answer) is the `require_single_boxed` option.

A grader must never hang or crash the run. math-verify's own timeout uses `signal.alarm`, which
only works on the main thread and cannot stop every hung sympy call, so laserjax turns it off
(`parsing_timeout=None`, `timeout_seconds=None`) and bounds time itself: `Grader` runs math-verify
in worker processes, gives each answer a deadline, and kills and replaces a worker that misses it.
An answer that misses its deadline, crashes its worker, or is absurdly long counts 0.

Reading the answer out of a response (and the rewards that need no math-verify) is
`laserjax.answers`. This module imports only the standard library, numpy and `laserjax.answers` at
the top; math-verify (and sympy) load in the worker processes, or on the first `grade_one` call.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from laserjax.answers import answer_to_str, count_boxed, extract_boxed, normalize_answer

DEFAULT_TIMEOUT_S = 5.0
"""Per-answer deadline of `Grader`, in seconds."""
DEFAULT_MAX_ANSWER_CHARS = 1000
"""Extracted answers longer than this are not parsed (they grade 0 unless the exact / numeric fast
path matches them): the longest reference answer of the five benchmarks is under 200 characters,
and parsing a huge answer is where sympy hangs."""


# ---------------------------------------------------------------------------------------------
# Equivalence (runs in the worker processes, or in-process through `grade_one`).

_math_verify_ready = False


def _load_math_verify() -> None:
    global _math_verify_ready
    if not _math_verify_ready:
        import math_verify  # noqa: F401  (the import is the point: sympy loads once, here)

        # laserjax bounds time itself (the worker deadline), so math-verify's "timeout disabled"
        # warning is expected; errors still show.
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _math_verify_ready = True


def is_equivalent(pred: str, gold: str) -> bool:
    """math-verify's `verify(parse("\\boxed{gold}"), parse("\\boxed{pred}"))`, no time limit.

    Safe off the main thread (no `signal.alarm`), but it can run for minutes on a pathological
    answer: call it through `Grader` for anything a model wrote.
    """
    _load_math_verify()
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """One graded response. `status` says why it got its grade:

    ok (math-verify or exact match decided), no_boxed, not_single_boxed, too_long (answer over
    `max_answer_chars`), timeout (missed the deadline; the worker was killed), error (math-verify
    raised, or the worker died).
    """

    extracted: str | None
    correct: float
    status: str


_PLAIN_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def _fast_match(pred: str, gold: str) -> bool:
    """Equal after `normalize_answer`, or equal as plain decimal numbers (`44.0` = `44`).

    Linear in the length of the answers, so it runs before the length guard: a long answer that
    equals the reference is correct however long it is; only parsing is bounded."""
    a, b = normalize_answer(pred), normalize_answer(gold)
    if a == b:
        return True
    if _PLAIN_NUMBER_RE.fullmatch(a) and _PLAIN_NUMBER_RE.fullmatch(b):
        import decimal

        return decimal.Decimal(a) == decimal.Decimal(b)
    return False


def _precheck(
    response: str, gold: str, require_single_boxed: bool, max_answer_chars: int | None, fast: bool
) -> tuple[str | None, GradeResult | None]:
    """The cheap part of grading, done in the caller: extraction, the format gate, the exact /
    numeric fast path (when `fast`), then the length guard on what would go to math-verify."""
    pred = extract_boxed(response)
    if pred is None:
        return None, GradeResult(None, 0.0, "no_boxed")
    if require_single_boxed and count_boxed(response) != 1:
        return pred, GradeResult(pred, 0.0, "not_single_boxed")
    if fast and _fast_match(pred, gold):
        return pred, GradeResult(pred, 1.0, "ok")
    if max_answer_chars is not None and len(pred) > max_answer_chars:
        return pred, GradeResult(pred, 0.0, "too_long")
    return pred, None


def grade_one(
    response: str, answer: str | int | float, *, require_single_boxed: bool = False
) -> float:
    """r_v of one response, in this process and without a time limit (LASER_SPEC section 6).

    1.0 when the last boxed answer of `response` is equivalent to `answer` (exact match after
    `normalize_answer`, else math-verify), 0.0 otherwise. For model outputs use `Grader`, which
    bounds the time each answer may take.
    """
    gold = answer_to_str(answer)
    pred, early = _precheck(response, gold, require_single_boxed, None, fast=True)
    if early is not None:
        return early.correct
    try:
        return float(is_equivalent(pred, gold))
    except Exception:  # math-verify raises on some malformed input: that answer is wrong.
        return 0.0


# ---------------------------------------------------------------------------------------------
# The worker pool.

_READY = "ready"


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Worker loop: receive (pred, gold), send back a bool or an error string; None stops it."""
    _load_math_verify()
    # sympy imports parts of itself on first use; pay for that before any answer's deadline runs.
    is_equivalent("0.5", "\\frac{1}{2}")
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        pred, gold = task
        try:
            conn.send(is_equivalent(pred, gold))
        except Exception as e:  # a malformed answer, not a broken worker: report and go on
            conn.send(f"{type(e).__name__}: {e}"[:300])


def _exit_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """A worker must not outlive its parent, even in the middle of a hung task.

    With `pdeathsig` (Linux, started from the parent's main thread) the kernel sends SIGKILL when
    the parent dies (PR_SET_PDEATHSIG), which works even while a C-level big-integer power holds
    the GIL. The signal fires when the parent *thread* ends, hence the main-thread condition.
    Otherwise a watchdog thread polls the parent (it cannot run while the GIL is held).
    """
    if pdeathsig:
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # it died before the call above
            os._exit(0)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _worker_entry(fd: int, parent_pid: int, pdeathsig: bool) -> None:
    """Entry point of a worker process (`python -c ...`, see `Grader._spawn`)."""
    _exit_with_parent(parent_pid, pdeathsig)
    _worker_main(multiprocessing.connection.Connection(fd))


_STARTUP_HINT = (
    "grader workers die at start-up: check that `python -c 'import math_verify; "
    "import laserjax.reward'` works in this environment"
)
_WORKER_CMD = (
    "import sys; from laserjax.reward import _worker_entry; "
    "_worker_entry(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == '1')"
)


@dataclasses.dataclass
class _Worker:
    process: subprocess.Popen
    conn: multiprocessing.connection.Connection
    spawned_at: float = dataclasses.field(default_factory=time.monotonic)
    ready: bool = False
    task: int | None = None
    """Index (in the current batch) of the answer it is grading."""
    deadline: float = 0.0


def default_num_workers() -> int:
    """The CPUs this process may use, capped at 16 (each worker holds sympy, ~150 MB)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


class Grader:
    """Grades responses in a pool of worker processes with a per-answer deadline.

    Cheap cases (no boxed answer, the single-box gate, over-long answers, an exact match) are
    decided in the caller without IPC. The rest go to workers, one answer per worker at a time;
    an answer still running `timeout_s` seconds after it was handed over grades 0 and its worker
    is killed (SIGKILL: a hung sympy call cannot be interrupted any other way) and replaced, so
    the pool keeps working. Workers start on first use as fresh interpreters (`python -c`, talking
    over a socket pair): nothing of the parent is forked (it may hold JAX/XLA threads) and, unlike
    multiprocessing's spawn, the caller's `__main__` is never re-imported, so scripts and notebooks
    without a `__main__` guard work. Each worker reports ready (math-verify imported) before it is
    given work, so start-up never counts against a deadline, and exits if its parent dies.

    Not thread-safe: call it from one thread. Use it as a context manager or call `close()`.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
        fast_path: bool = True,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"Grader num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"Grader timeout_s must be > 0 seconds, got {timeout_s}")
        self.num_workers = num_workers or default_num_workers()
        self.timeout_s = float(timeout_s)
        self.max_answer_chars = max_answer_chars
        self.fast_path = fast_path
        """Accept an exact match after `normalize_answer` without math-verify; False sends every
        answer through math-verify (to test the verifier itself)."""
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self.stats = collections.Counter()
        """Running totals: graded, ipc (answers sent to workers), timeouts, errors,
        workers_started, worker_restarts."""

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Stop every worker (politely, then by force). The grader can be used again after."""
        workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in workers:
            try:
                w.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()
            w.conn.close()

    def start(self) -> None:
        """Start the workers now and wait until each is ready (math-verify imported).

        Optional: grading starts them on first need. Call it early (e.g. while a model loads) to
        take the start-up off the first batch's clock.
        """
        self._start_workers()
        deadline = time.monotonic() + self.startup_timeout_s
        while not all(w.ready for w in self._workers):
            waiting = {w.conn: w for w in self._workers if not w.ready}
            for conn in multiprocessing.connection.wait(
                list(waiting), timeout=max(0.0, deadline - time.monotonic())
            ):
                w = waiting[conn]
                try:
                    w.ready = conn.recv() == _READY
                except (EOFError, OSError):
                    self.close()
                    raise RuntimeError(_STARTUP_HINT) from None
            if time.monotonic() >= deadline:
                self.close()
                raise RuntimeError(
                    f"no grader worker became ready within "
                    f"{self.startup_timeout_s:.0f} s; {_STARTUP_HINT}"
                )

    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        package_root = str(pathlib.Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        pdeathsig = (
            sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        )
        with child_sock:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_CMD,
                    str(child_sock.fileno()),
                    str(os.getpid()),
                    "1" if pdeathsig else "0",
                ],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        self.stats["workers_started"] += 1
        return _Worker(process, multiprocessing.connection.Connection(parent_sock.detach()))

    def _replace(self, w: _Worker) -> None:
        w.process.kill()
        w.process.wait()
        w.conn.close()
        fresh = self._spawn()
        w.process, w.conn, w.spawned_at = fresh.process, fresh.conn, fresh.spawned_at
        w.ready, w.task = False, None
        self.stats["worker_restarts"] += 1

    def _start_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    # -- grading -------------------------------------------------------------------------------

    def grade_batch(
        self,
        responses: Sequence[str],
        answers: Sequence[str | int | float],
        *,
        require_single_boxed: bool = False,
    ) -> np.ndarray:
        """r_v of each response as float32 0/1, shape (len(responses),)."""
        results = self.grade_detailed(responses, answers, require_single_boxed=require_single_boxed)
        return np.asarray([r.correct for r in results], dtype=np.float32)

    def grade_detailed(
        self,
        responses: Sequence[str],
        answers: Sequence[str | int | float],
        *,
        require_single_boxed: bool = False,
    ) -> list[GradeResult]:
        """One `GradeResult` (extracted answer, 0/1, status) per response, in order."""
        if len(responses) != len(answers):
            raise ValueError(
                f"grade: {len(responses)} responses but {len(answers)} answers; "
                "pass one reference answer per response"
            )
        results: list[GradeResult | None] = [None] * len(responses)
        pending: collections.deque[tuple[int, str, str]] = collections.deque()
        for i, (response, answer) in enumerate(zip(responses, answers, strict=True)):
            if not isinstance(response, str):
                raise TypeError(f"grade: response {i} is {type(response).__name__}, not a string")
            gold = answer_to_str(answer)
            pred, early = _precheck(
                response, gold, require_single_boxed, self.max_answer_chars, self.fast_path
            )
            if early is not None:
                results[i] = early
            else:
                pending.append((i, pred, gold))
        if pending:
            self._run(pending, results)
        self.stats["graded"] += len(results)
        return results  # type: ignore[return-value]

    def _run(
        self, pending: collections.deque[tuple[int, str, str]], results: list[GradeResult | None]
    ) -> None:
        self._start_workers()
        preds = {i: pred for i, pred, _ in pending}
        startup_failures = 0

        def finish(w: _Worker, correct: float, status: str) -> None:
            results[w.task] = GradeResult(preds[w.task], correct, status)
            w.task = None

        while pending or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    try:
                        w.conn.send(pending[0][1:])
                    except OSError:  # it died while idle: replace it, the answer waits
                        self._replace(w)
                        continue
                    w.task, w.deadline = pending.popleft()[0], now + self.timeout_s
                    self.stats["ipc"] += 1
            busy = [w.deadline for w in self._workers if w.task is not None]
            starting = [w.spawned_at + self.startup_timeout_s for w in self._workers if not w.ready]
            wait_s = max(0.0, min(busy + starting, default=now) - now)
            by_fd = {w.conn: w for w in self._workers}
            for conn in multiprocessing.connection.wait(list(by_fd), timeout=wait_s):
                w = by_fd[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    if w.task is not None:
                        finish(w, 0.0, "error")
                        self.stats["errors"] += 1
                    elif not w.ready:
                        startup_failures += 1
                        if startup_failures > 2 * self.num_workers:
                            self.close()
                            raise RuntimeError(_STARTUP_HINT) from None
                    self._replace(w)
                    continue
                if msg == _READY:
                    w.ready = True
                elif isinstance(msg, bool):
                    finish(w, float(msg), "ok")
                else:
                    finish(w, 0.0, "error")
                    self.stats["errors"] += 1
            now = time.monotonic()
            for w in self._workers:
                if w.task is not None and now >= w.deadline:
                    finish(w, 0.0, "timeout")
                    self.stats["timeouts"] += 1
                    self._replace(w)
            if not any(w.ready for w in self._workers) and all(
                now >= w.spawned_at + self.startup_timeout_s for w in self._workers
            ):
                self.close()
                raise RuntimeError(
                    f"no grader worker became ready within "
                    f"{self.startup_timeout_s:.0f} s; {_STARTUP_HINT}"
                )
