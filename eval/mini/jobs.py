"""The miniature's processes: stages run as logged subprocesses, side by side, beside the preflight; stage times."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from eval.mini.config import Paths
from eval.mini.preflight import PreflightError, job_env

logger = logging.getLogger("eval.mini.reproduce")

REPO = Path(__file__).resolve().parents[2]
Job = tuple[str, Sequence[str], dict[str, str] | None]  # (name, command, extra environment)


class Background:
    """A command running beside the stages (the preflight): stages poll it and stop as soon as it has failed."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log_path, self.start = name, log_path, time.perf_counter()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=job_env())
        logger.info("%s: running beside the first stages (log: %s)", name, log_path)

    def failed(self) -> bool:
        """True once the command has exited with an error."""
        return self.process.poll() not in (None, 0)

    def error(self) -> PreflightError:
        """The failure, with the end of the command's log (it names the broken stage)."""
        tail = "\n".join(self.log_path.read_text().splitlines()[-15:])
        return PreflightError(f"{self.name} (exit {self.process.returncode}); last lines of {self.log_path}:\n{tail}")

    def wait(self) -> float:
        """Wait for the command; its seconds. Raises PreflightError if it failed."""
        if self.process.wait() != 0:
            raise self.error()
        return round(time.perf_counter() - self.start, 1)

    def stop(self) -> None:
        """Terminate the command if it still runs (a later stage failed first): no orphan outlives the job."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(name: str, command: Sequence[str], paths: Paths, env: dict[str, str] | None) -> subprocess.Popen:
    """Start ``command`` from the repository root, its output appended to ``<logs>/<name>.log``."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_path = paths.logs / f"{name}.log"
    logger.info("%s: running (log: %s)", name, log_path)
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=job_env(env))


def run_parallel(jobs: Sequence[Job], paths: Paths, watch: Background | None = None) -> None:
    """Run ``(name, command, env)`` jobs side by side; raise naming the first that fails (the others are stopped).

    ``watch``: a background check whose failure stops the jobs too (PreflightError).
    """
    running = {name: _start(name, command, paths, env) for name, command, env in jobs}
    try:
        while running:
            if watch is not None and watch.failed():
                raise watch.error()
            for name, process in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    log_path = paths.logs / f"{name}.log"
                    tail = "\n".join(log_path.read_text().splitlines()[-20:])
                    raise RuntimeError(f"stage {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
            time.sleep(0.5)
    finally:
        for process in running.values():
            process.terminate()
            process.wait()


def run_logged(name: str, command: Sequence[str], paths: Paths, env: dict[str, str] | None = None,
               watch: Background | None = None) -> None:  # fmt: skip
    """Run ``command`` from the repository root, its output in ``<logs>/<name>.log``; raise if it fails."""
    run_parallel([(name, command, env)], paths, watch)


class Timer:
    """Seconds per stage, kept in ``<root>/timings.json`` across resumed runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        self.start = time.perf_counter()

    def stage(self, name: str, done: Callable[[], bool], work: Callable[[], None], accumulate: bool = False) -> None:
        """Run ``work`` unless ``done()``; check that it produced its output; record how long it took.

        A stage that was done already is only reported as skipped (no time: this run spent none on it).
        ``accumulate``: add this run's seconds to those recorded by interrupted runs (a stage that resumes part way).
        """
        if done():
            logger.info("%s: done already, skipped", name)
            return
        start = time.perf_counter()
        work()
        if not done():
            raise RuntimeError(f"stage {name} finished but its output is missing")
        seconds = round(time.perf_counter() - start, 1)
        earlier = self.times.get(name, 0.0) if accumulate else 0.0
        self.times[name] = round(earlier + seconds, 1)
        self.path.write_text(json.dumps(self.times, indent=1))
        total = f", {self.times[name]:.1f} s with earlier runs" if earlier else ""
        logger.info("%s: done in %.1f s%s (%s elapsed)", name, seconds, total, clock(time.perf_counter() - self.start))

    def record(self, name: str, seconds: float) -> None:
        """Record a time measured elsewhere (the preflight's)."""
        self.times[name] = seconds
        self.path.write_text(json.dumps(self.times, indent=1))


def clock(seconds: float) -> str:
    """``m:ss``."""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
