"""Resumable training: the loop's whole state at an evaluation, written atomically, no pickle.

    ckpt = Checkpoint(out / CHECKPOINT_DIR)
    ckpt.save(step=..., params=..., optimizer=opt, scheduler=sched, best=..., state={...})
    saved = ckpt.load(params, opt, sched, fingerprint)    # None when there is nothing to resume

A long run (a one-epoch reference over 11,752 reviews is ~1,300 steps, an hour of CPU) must
survive the end of a sitting. At every evaluation the loop saves the trained parameters, the best
parameters so far, AdamW's moments, the scheduler's position and the loop's counters. Tensors go
to safetensors and scalars to JSON, never to pickle. The folder is replaced by one rename, so a
kill leaves the previous checkpoint whole. The data order needs no saved RNG state: epoch e's
order is the e-th shuffle of Random(seed), which a resumed run replays. Dropout (none in the
models used here) is not restored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..core.atomic import previous, publish_dir, read_json

__all__ = ["CHECKPOINT_DIR", "Checkpoint", "CheckpointMismatch"]

CHECKPOINT_DIR = "checkpoint"
TENSORS, STATE = "tensors.safetensors", "state.json"


class CheckpointMismatch(ValueError):
    """A checkpoint made by another run (other settings, data or model); one-line message."""


class Checkpoint:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def exists(self) -> bool:
        return (self.folder / STATE).is_file()

    def save(self, *, params: Sequence[torch.nn.Parameter], best: Sequence[torch.Tensor] | None,
             optimizer: torch.optim.Optimizer, scheduler, state: dict) -> None:
        """`state`: the loop's JSON-able counters (step, history, best loss, fingerprint, ...)."""
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        if best is not None:
            tensors.update({f"best.{i}": t.detach().cpu().contiguous() for i, t in enumerate(best)})
        for i, p in enumerate(params):
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):  # AdamW: step, exp_avg, exp_avg_sq
                    tensors[f"opt.{i}.{key}"] = value.detach().cpu().contiguous().clone()
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        # the old checkpoint stays whole until the new one is complete
        with publish_dir(self.folder, replace=True) as tmp:
            save_file(tensors, str(tmp / TENSORS))
            (tmp / STATE).write_text(json.dumps({**state, "scheduler": sched}, indent=1))

    def load(self, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
             fingerprint: dict) -> tuple[dict, list[torch.Tensor] | None] | None:
        """Restore params, optimizer and scheduler in place -> (state, best tensors or None);
        None when no checkpoint exists. A checkpoint whose fingerprint differs is refused."""
        folder = self.folder
        if not self.exists():
            old = previous(folder)  # killed between the two renames of save()
            if not (old / STATE).is_file():
                return None
            folder = old
        state = read_json(folder / STATE, "a training checkpoint", CheckpointMismatch)
        if state.get("fingerprint") != fingerprint:
            diff = sorted(k for k in set(fingerprint) | set(state.get("fingerprint", {}))
                          if fingerprint.get(k) != state.get("fingerprint", {}).get(k))
            raise CheckpointMismatch(f"{folder} was made by a run with other {', '.join(diff)}; "
                                     "resume with the same settings, or remove it to start over")
        tensors = load_file(str(folder / TENSORS))
        device = params[0].device
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, i, key = name.split(".", 2)
                p = params[int(i)]
                optimizer.state[p][key] = value if key == "step" else value.to(device)
        scheduler.load_state_dict({**state.pop("scheduler"), "lr_lambdas": [None] * len(optimizer.param_groups)})
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        best = [tensors[f"best.{i}"].to(device) for i in range(len(params))] if "best.0" in tensors else None
        return state, best

    def remove(self) -> None:
        for folder in (self.folder, self.folder.parent / f".{self.folder.name}-old"):
            shutil.rmtree(folder, ignore_errors=True)
