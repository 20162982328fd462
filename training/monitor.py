"""Loss monitoring, progress bar and the loss plot of a run."""
from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback


class LossMonitor(TrainerCallback):
    """Collects train/eval losses, drives a rich progress bar, warns on overfitting, stops at a target loss."""

    def __init__(self, cfg, *, show_progress: bool = True, echo=print):
        self.cfg = cfg
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []
        self.warnings: list[str] = []
        self.stopped_reason = ""
        self.echo = echo
        self._rising = 0
        self._progress = None
        self._task_id = None
        self.show_progress = show_progress

    # progress -------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kw):
        if self.show_progress:
            self._progress = Progress(TextColumn("[bold]train[/bold] {task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task_id = self._progress.add_task("", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self._progress is not None:
            last = f"loss {self.train[-1][1]:.4f}" if self.train else ""
            self._progress.update(self._task_id, completed=state.global_step, description=last)

    def on_train_end(self, args, state, control, **kw):
        if self._progress is not None:
            self._progress.update(self._task_id, completed=state.global_step)
            self._progress.stop()
            self._progress = None

    # losses -------------------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            self.train.append((step, float(logs["loss"])))
            if self.cfg.target_loss > 0:
                recent = [v for _, v in self.train[-5:]]
                if len(recent) >= min(5, self.cfg.max_steps) and sum(recent) / len(recent) <= self.cfg.target_loss:
                    self.stopped_reason = (f"target loss {self.cfg.target_loss} reached at step {step} "
                                           f"(mean of last {len(recent)}: {sum(recent) / len(recent):.4f})")
                    control.should_training_stop = True
        if "eval_loss" in logs:
            val = float(logs["eval_loss"])
            if self.eval and val > self.eval[-1][1]:
                self._rising += 1
                if self._rising >= self.cfg.overfit_patience:
                    msg = (f"possible overfitting: eval loss rose {self._rising} evaluations in a row "
                           f"({self.eval[-1][1]:.4f} -> {val:.4f} at step {step}); consider fewer steps, a lower "
                           "learning rate or more data")
                    self.warnings.append(msg)
                    self.echo(f"[train] warning: {msg}")
                    if self.cfg.stop_on_overfit:
                        self.stopped_reason = msg
                        control.should_training_stop = True
            else:
                self._rising = 0
            self.eval.append((step, val))
            ref = self.eval[0][1] if self.eval[0][0] == 0 else None
            self.echo(f"[train] step {step}: held-out loss {val:.4f}"
                      + (f" ({val / ref:.3f}x of step 0, the base model)" if ref and step else ""))


def plot_losses(path: Path, train: list, evals: list, title: str) -> Path:
    # lazy: matplotlib costs ~0.8 s to import; only the loss plot needs it
    import matplotlib

    matplotlib.use("Agg")
    # lazy: matplotlib costs ~0.8 s to import; only the loss plot needs it
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
