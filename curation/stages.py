"""Resumable curation stages: reader -> mapper -> writer steps with atomic outputs.

Every stage owns one folder under the run directory. It writes ``started.json`` (the
stage's fingerprint: a hash of the config it depends on and of its inputs' fingerprints)
before any output, writes each output atomically (``dinotxt.utils.fileio``), and writes
``done.json`` (fingerprint, statistics, seconds) last. A rerun therefore:

- skips a stage whose ``done.json`` carries the current fingerprint;
- resumes a stage that started with the current fingerprint but did not finish (sharded
  stages skip the shards they find; k-means restarts from its last finished phase);
- recomputes a cheap stage whose inputs or settings changed (its folder is cleared), and
  refuses to silently discard an expensive one (``Stage(expensive=True)``: the embeddings),
  saying how to start over.

With several processes (``ranks.Ranks``) every rank runs the stage's work on its share of the
work items, each item's output written atomically by the rank that ran it (progress is per item,
never per rank, so a rerun with another number of processes continues it). Rank 0 alone decides
whether the stage is done, prepares the folder, and, once every rank is through and every item's
output is on disk, writes ``done.json``, which says how the work was shared: ``"ranks": N`` and
``"items_per_rank"``, the work items each rank ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import OmegaConf

from dinotxt.config import ConfigError
from dinotxt.utils.fileio import atomic_write_json

from .ranks import Ranks

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (OmegaConf nodes are converted)."""
    plain = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """Bookkeeping of one stage folder.

    Args:
        name: stage name (shown in logs; ``--stage NAME`` selects it).
        folder: where its outputs live.
        fingerprint: hash of everything its outputs depend on.
        expensive: a changed fingerprint raises instead of clearing the folder.
    """

    def __init__(self, name: str, folder: Path, fingerprint: str, expensive: bool = False):
        self.name, self.folder, self.fingerprint, self.expensive = name, Path(folder), fingerprint, expensive

    def _read(self, file: str) -> Optional[Dict]:
        path = self.folder / file
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None

    @property
    def done(self) -> bool:
        state = self._read("done.json")
        return bool(state) and state.get("fingerprint") == self.fingerprint

    @property
    def stats(self) -> Dict:
        return (self._read("done.json") or {}).get("stats", {})

    def begin(self) -> bool:
        """Prepare the folder; True when resuming earlier partial work of the same fingerprint."""
        started = self._read("started.json")
        if started and started.get("fingerprint") == self.fingerprint:
            return True
        if started or (self.folder.exists() and any(self.folder.iterdir())):
            if self.expensive:
                raise ConfigError(
                    f"{self.folder} holds '{self.name}' outputs made with different settings or inputs; "
                    f"delete that folder to recompute them, or pick a new run name (name=NEW_NAME)")
            log.info(f"{self.name}: settings or inputs changed, recomputing")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / "started.json", {"stage": self.name, "fingerprint": self.fingerprint})
        return False

    def finish(self, stats: Dict, seconds: float, items_per_rank: Sequence[int] = (1,)) -> None:
        atomic_write_json(self.folder / "done.json", {
            "stage": self.name, "fingerprint": self.fingerprint, "seconds": round(seconds, 2),
            "ranks": len(items_per_rank), "items_per_rank": [int(i) for i in items_per_rank], "stats": stats})


def run_stage(stage: Stage, work: Callable[[bool], Dict], ranks: Optional[Ranks] = None,
              outputs: Optional[Callable[[], List[Path]]] = None) -> Dict:
    """Run ``work(resuming)`` on every rank unless the stage is already done; returns the stage's statistics
    (rank 0's). ``outputs()`` lists the files every work item must have left: rank 0 checks them before
    writing ``done.json``. ``ranks.items`` counts the work items each rank ran (``Ranks.share``)."""
    ranks = ranks or Ranks()
    if ranks.on_zero(lambda: stage.done):
        log.info(f"{stage.name}: done earlier, skipped")
        return ranks.on_zero(lambda: stage.stats)
    resuming = ranks.on_zero(stage.begin)
    log.info(f"{stage.name}: {'resuming' if resuming else 'running'}")
    start = time.time()
    ranks.items = 0
    stats = work(resuming)
    items = ranks.all_gather(ranks.items)  # also: every rank is through its work

    def finish() -> None:
        missing = [p for p in (outputs() if outputs else []) if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"{stage.name}: {len(missing)} work item(s) left no output (e.g. {missing[0]}); "
                                    "rerun to finish them")
        stage.finish(stats, time.time() - start, items)
    ranks.on_zero(finish)
    log.info(f"{stage.name}: done in {time.time() - start:.1f} s" +
             (f" ({ranks.world} processes, work items per process: {items})" if ranks.world > 1 else ""))
    return stats
