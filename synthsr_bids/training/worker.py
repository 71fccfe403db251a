"""The ``train`` command's work, in this process or in each data-parallel worker (:mod:`.parallel`).

A module of its own because spawned workers import the function they run by name, which a
``python -m`` entry point (``__main__``) cannot offer.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

__all__ = ["setup_logging", "train_worker"]

LOGGER = logging.getLogger("synthsr_bids.training")


def setup_logging(verbose: int, log_file: Path | None) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)


def train_worker(config, group, *, verbose: int = 0, max_steps: int | None = None,  # type: ignore[no-untyped-def]
                 max_minutes: float | None = None) -> None:
    """One training worker (the only one unless ``[run].processes`` > 1): rank 0 logs to ``train.log``."""
    from synthsr_bids.allocator import keep_freed_memory

    from .loop import Trainer, TrainingError

    run_dir = Path(config.run.dir).resolve()
    setup_logging(verbose, run_dir / "train.log")
    if not group.is_main and not verbose:  # the other workers log only their warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    if config.run.keep_freed_memory and keep_freed_memory():  # before the first tensor
        LOGGER.info("memory allocator: freed memory is kept for reuse (run.keep_freed_memory)")
    trainer: Trainer | None = None
    stopped = False

    def stop(signum: int, _frame: object) -> None:  # installed before the (slow) set-up: no signal is lost
        nonlocal stopped
        LOGGER.warning("signal %d: stopping after the current step", signum)
        stopped = True
        if trainer is not None:
            trainer.stop_requested = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        trainer = Trainer(config, group=group)
        trainer.stop_requested = stopped
        summary = trainer.run(max_steps=max_steps, max_minutes=max_minutes)
    except TrainingError as exc:
        if group.world > 1:  # in a spawned worker: into train.log, then up to the launcher
            LOGGER.error("worker %d: %s", group.rank, exc)
        raise
    except Exception:
        if group.world > 1:
            LOGGER.exception("worker %d failed", group.rank)
        raise
    if group.is_main:
        LOGGER.info("session over: stage %s, global step %d (%d steps this session), checkpoint %s, model %s",
                    summary.stage, summary.global_step, summary.steps_this_session, summary.checkpoint, summary.model)
