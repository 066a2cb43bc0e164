"""PRIME reward manager: score samples in parallel worker processes with a hard per-sample time limit.

Meant for slow or untrusted scoring (running generated code, symbolic math). Each sample runs in a pool process
under a ``SIGALRM`` limit of ``timeout_s``; a call stuck in C code that ignores the alarm is caught by a deadline on
the driver side, after which the pool is terminated. Either way the sample gets ``error_score`` and a warning,
and the batch goes on.

Processes are forked (where the platform allows it) so the scoring function need not be picklable: closures and
functions loaded from ``custom_reward_function.path`` work as is. With ``mp_start_method="spawn"`` or
``"forkserver"`` it must be importable by name.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import time
from typing import Any, Callable, Sequence

import torch

from verl.workers.reward_manager.abstract import AbstractRewardManager, RawRewardFn
from verl.workers.reward_manager.common import (ErrorLog, Examiner, RewardSample, RewardTimeoutError, ScoreOutcome,
                                                build_reward_extra_info, build_reward_tensor, extract_samples,
                                                has_rm_scores, normalize_result, rm_scores_result)
from verl.workers.reward_manager.registry import register

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_WORKERS = 64

# The scoring function of the pool processes (set before fork, or by the initializer under spawn).
_WORKER_FN: Callable[..., Any] | None = None


def _init_worker(fn: Callable[..., Any] | None) -> None:
    global _WORKER_FN
    if fn is not None:
        _WORKER_FN = fn
    # Ctrl-C goes to the driver, which terminates the pool; workers should not print tracebacks for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_one(kwargs: dict[str, Any], timeout_s: float | None) -> tuple[str, Any]:
    """Score one sample inside a pool process: ``("ok", result)``, ``("timeout", msg)`` or ``("error", msg)``."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise RewardTimeoutError(f"reward function exceeded {timeout_s}s")

    try:
        if timeout_s:
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
        try:
            result = _WORKER_FN(**kwargs)  # type: ignore[misc]
        finally:
            if timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
        normalize_result(result)  # fail here, with the real exception, rather than on the driver
        return "ok", result
    except RewardTimeoutError as exc:
        return "timeout", str(exc)
    except BaseException as exc:  # noqa: BLE001 - report everything; SystemExit from user code included
        return "error", f"{type(exc).__name__}: {exc}"


class _RemoteError(Exception):
    """An exception raised in a pool process, carried back as text."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _default_start_method() -> str:
    return "fork" if "fork" in mp.get_all_start_methods() and os.name == "posix" else "spawn"


@register("prime")
class PrimeRewardManager(AbstractRewardManager):
    """Parallel scoring in a process pool; the score goes at the last valid response token.

    Args (besides the base ones):
        num_workers: pool size (default ``min(cpu_count, 64)``, never more than the batch size).
        timeout_s: per-sample limit in seconds (default 300).
        mp_start_method: ``fork`` (default on POSIX), ``spawn`` or ``forkserver``.
    """

    def __init__(self,
                 tokenizer: Any,
                 num_examine: int,
                 compute_score: RawRewardFn | None = None,
                 reward_fn_key: str = "data_source",
                 error_score: float = 0.0,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 num_workers: int | None = None,
                 mp_start_method: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, num_examine, compute_score, reward_fn_key, error_score=error_score)
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"prime reward manager: timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.num_workers = int(num_workers or min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS))
        if self.num_workers < 1:
            raise ValueError(f"prime reward manager: num_workers must be >= 1, got {num_workers!r}")
        self.mp_start_method = mp_start_method or _default_start_method()
        if self.mp_start_method not in mp.get_all_start_methods():
            raise ValueError(f"prime reward manager: mp_start_method={self.mp_start_method!r} is not available here; "
                             f"choose one of {mp.get_all_start_methods()}")
        if self.mp_start_method != "fork":
            try:
                pickle.dumps(self.compute_score)
            except Exception as exc:
                raise TypeError(f"prime reward manager: with mp_start_method={self.mp_start_method!r} the scoring "
                                f"function is sent to worker processes by pickling, and {self.compute_score!r} cannot "
                                f"be pickled ({type(exc).__name__}: {exc}). Use a module-level function or "
                                f"mp_start_method='fork'.") from exc

    # ------------------------------------------------------------------------------------------------------------------

    def _score_parallel(self, samples: Sequence[RewardSample], errors: ErrorLog) -> list[ScoreOutcome]:
        global _WORKER_FN
        if not samples:
            return []
        n_proc = min(self.num_workers, len(samples))
        ctx = mp.get_context(self.mp_start_method)
        forked = self.mp_start_method == "fork"
        previous = _WORKER_FN
        _WORKER_FN = self.compute_score  # inherited by forked workers without pickling
        outcomes: list[ScoreOutcome | None] = [None] * len(samples)
        hung = False
        pool = None
        try:
            pool = ctx.Pool(processes=n_proc,
                            initializer=_init_worker,
                            initargs=(None if forked else self.compute_score,))
            pending = [(s, pool.apply_async(_run_one, (s.score_kwargs(), self.timeout_s))) for s in samples]
            # Samples queue behind each other, so the driver's deadline allows every wave its full limit with 50%
            # slack (and a second for process start-up); the in-worker alarm normally fires long before.
            waves = math.ceil(len(samples) / n_proc)
            deadline = time.monotonic() + 1.5 * waves * self.timeout_s + 1.0
            for sample, handle in pending:
                remaining = max(deadline - time.monotonic(), 0.0)
                try:
                    status, payload = handle.get(timeout=remaining)
                except mp.TimeoutError:
                    hung = True
                    outcomes[sample.index] = errors.record(
                        sample,
                        RewardTimeoutError(f"no result within the driver deadline ({self.timeout_s}s per "
                                           f"sample); the worker is stuck and will be killed"))
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                    outcomes[sample.index] = errors.record(sample, exc)
                    continue
                if status == "ok":
                    try:
                        outcomes[sample.index] = normalize_result(payload)
                    except Exception as exc:  # noqa: BLE001
                        outcomes[sample.index] = errors.record(sample, exc)
                elif status == "timeout":
                    outcomes[sample.index] = errors.record(sample, RewardTimeoutError(payload))
                else:
                    kind, _, message = str(payload).partition(": ")
                    outcomes[sample.index] = errors.record(sample, _RemoteError(kind, message))
        except BaseException:  # interrupted: do not wait for the workers
            hung = True
            raise
        finally:
            _WORKER_FN = previous
            if pool is not None:
                if hung:
                    pool.terminate()
                else:
                    pool.close()
                pool.join()
        return [o for o in outcomes if o is not None]

    def _score(self, data: Any) -> tuple[list[RewardSample], list[ScoreOutcome]]:
        samples = extract_samples(data, self.tokenizer, self.reward_fn_key)
        errors = ErrorLog(self.error_score)
        outcomes = self._score_parallel(samples, errors)
        errors.summarize()
        scores = [o.score for o in outcomes]
        data.batch["acc"] = torch.tensor(scores, dtype=torch.float32, device=data.batch["prompts"].device)
        return samples, outcomes

    def verify(self, data: Any) -> list[float]:
        """Scores of every sample (also stored as ``data.batch["acc"]``, as PRIME recipes expect)."""
        _, outcomes = self._score(data)
        return [o.score for o in outcomes]

    def __call__(self, data: Any, return_dict: bool = False) -> torch.Tensor | dict[str, Any]:
        if has_rm_scores(data):
            return rm_scores_result(data, return_dict)
        samples, outcomes = self._score(data)
        scores = [o.score for o in outcomes]
        examiner = Examiner(self.num_examine)
        for sample, outcome in zip(samples, outcomes):
            examiner.maybe_print(sample, outcome)
        reward_tensor = build_reward_tensor(data, samples, scores)
        if return_dict:
            return {"reward_tensor": reward_tensor, "reward_extra_info": build_reward_extra_info(outcomes)}
        return reward_tensor
