"""What a run writes for people to read (rank 0): console progress with rate and ETA, TensorBoard scalars,
metrics.jsonl, and where sample grids go; kept consistent when a run resumes from an earlier checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import time


class Reporter:
    """Rank 0's outputs: console progress with rate and ETA, TensorBoard, metrics.jsonl."""

    def __init__(self, run_dir: str, total_steps: int, global_batch: int, enabled: bool, first_step: int) -> None:
        self.enabled, self.total, self.global_batch = enabled, total_steps, global_batch
        self.start, self.start_step = time.monotonic(), first_step
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(run_dir, exist_ok=True)
            # A resumed run redoes the steps after its checkpoint (a restart before the first checkpoint: all of
            # them): their earlier records go, not doubled.
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=first_step + 1)
            path = os.path.join(run_dir, "metrics.jsonl")
            _drop_records_after(path, first_step)
            _end_with_newline(path)
            self.jsonl = open(path, "a")

    def scalars(self, step: int, prefix: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "split": prefix, "time": round(time.time(), 3), **metrics}) + "\n")
        self.jsonl.flush()

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (step - self.start_step) / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"[train] step {step}/{self.total} {shown} | {rate * self.global_batch:.1f} samples/s "
              f"{rate:.2f} steps/s | ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _drop_records_after(path: str, step: int) -> None:
    """Rewrite metrics.jsonl without the records of steps after ``step`` (atomically; unparsable lines kept)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass
        kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _end_with_newline(path: str) -> None:
    """A record cut short by a crash (no newline) would glue itself to the next one appended: drop it if it is
    not whole JSON, else end it."""
    if not os.path.exists(path) or not os.path.getsize(path):
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            f.truncate(start)
            return
        f.write(b"\n")


def grid_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "samples", f"step-{step:08d}.png")


def missed_at_resume(run_dir: str, step: int, eval_is_due: bool, grid_is_due: bool) -> tuple[bool, bool]:
    """Rank 0, on resuming at ``step``: whether that step's eval record (metrics.jsonl) and sample grid are due
    but missing (the run stopped between its checkpoint and them)."""
    eval_missing = eval_is_due
    if eval_missing:
        with contextlib.suppress(OSError), open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if record["step"] == step and record["split"] == "eval":
                        eval_missing = False
                        break
                except (ValueError, KeyError, TypeError):
                    continue
    return eval_missing, grid_is_due and not os.path.exists(grid_path(run_dir, step))
