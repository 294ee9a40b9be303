"""Large contrastive batches on one machine: the dense loss, the blocked loss and gradient caching,
measured in one run at global batches of 1k, 4k, 16k and 65k (dinotxt issue 14).

The configuration: the demo model's dimensions (``dinotxt_demo``: a DINOv2-architecture ViT-S/14
with 4 blocks at 112 px, frozen; a text tower of 4 layers x 256 wide, context 32, vocabulary from a
SentencePiece model trained on the captions), with the LiT head on pooled cached tokens (768-d
embeddings; ``--head dinotxt`` for the demo's one trainable block over all 69 cached tokens).
Every row trains from a real feature cache (``dinotxt cache``, written first from the procedural
world): its global batch is read through the training stream once per size and kept in memory,
so the timed steps measure the optimizer step, not the disk. AdamW with the training parameter
groups, the same initial weights in every row.

Rows (each an exact step of the whole global batch's InfoNCE):
  one pass, dense loss       the whole batch forward and backward with a graph, dense loss (baseline)
  one pass, blocked loss     the same with ``loss.block_size`` (tiles of --block, streaming log-sum-exp)
  GradCache 256, dense       gradient caching (``data.global_batch``) from micro-batches of --micro
  GradCache 256, blocked     the same with the blocked loss in its pass-1 loss

Memory: the peak resident memory a step adds to the process (Linux: ``/proc/self/clear_refs``
resets the high-water mark before the step; the script runs itself with a fixed glibc mmap
threshold, so freed tensors leave the resident set and the mark is the peak of live memory),
and the same for the loss alone (forward and backward on the global batch's embeddings). A
cell whose memory, extrapolated from the smaller sizes, would exceed --max-gib is skipped
with the estimate printed. The dense logits column is what the two fp32 (B, B) logit matrices
of one process take.

    python bench/large_batch.py                       # the table (long on 2 CPU cores: 65k steps take minutes)
    python bench/large_batch.py --sizes 256,1024 --micro 64 --block 256   # a quick look
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
BASELINE = "one pass, dense loss"
HEADS = {
    "lit": {"num_blocks": 0, "final_norm": False, "drop_path": 0.0},  # trains on pooled [CLS, mean patches]
    "dinotxt": {},  # the demo head: one block (drop path 0.3) over all cached tokens
}


def row_names(micro: int) -> Dict[str, tuple]:
    """row name -> (gradient caching?, blocked loss?)"""
    return {BASELINE: (False, False), "one pass, blocked loss": (False, True),
            f"GradCache {micro}, dense": (True, False), f"GradCache {micro}, blocked": (True, True)}


# --------------------------------------------------------------------------- memory


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_supported() -> Optional[str]:
    """None if the peak of a region can be measured here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
    except OSError as e:
        return f"cannot reset the peak resident set ({e}); memory columns are not measured"
    return None


def measure(fn: Callable[[], None], memory: bool) -> tuple:
    """(seconds, peak resident bytes added while ``fn`` ran, or None)."""
    base = None
    if memory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current resident set
        base = _status_bytes("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, (_status_bytes("VmHWM") - base) if memory else None


# --------------------------------------------------------------------------- data and model


def build(work: Path, head: str, samples: int):
    """The demo world, a tokenizer trained on its captions, and its feature cache; (cfg, tokenizer)."""
    from dinotxt.config import load_train_config
    from dinotxt.data.sources import expand_shards, iter_tar_samples
    from dinotxt.data.world import write_world
    from dinotxt.features.build_cache import build_cache
    from dinotxt.text.sentencepiece import train_tokenizer

    write_world(str(work / "world"), num_train=samples, num_eval=0, size=128, samples_per_shard=max(64, samples // 4),
                seed=0)
    overrides = ["model.arch=dinotxt_demo", f"data.train={work / 'world' / 'train'}", "data.world.generate=false",
                 "data.num_workers=0", f"cache.path={work / 'cache'}", "cache.batch_size=64",
                 f"cache.tokens={'pooled' if head == 'lit' else 'all'}"]
    overrides += [f"model.vision_head.{k}={v}" for k, v in HEADS[head].items()]
    cfg = load_train_config(None, overrides)
    captions = [s["txt"].decode() for shard in expand_shards(cfg.data.train) for s in iter_tar_samples(shard, {})]
    tokenizer = train_tokenizer(captions, cfg.model.text.vocab_size, cfg.model.text.context_length)
    cfg.model.text.vocab_size = tokenizer.vocab_size
    summary = build_cache(cfg, device="cpu", log=lambda *_: None)
    print(f"[bench] feature cache: {summary['samples']} samples, tokens {summary['token_shape']}, "
          f"{summary['bytes'] / 2**20:.1f} MiB", flush=True)
    return cfg, tokenizer


def read_global_batch(cfg, tokenizer, size: int, micro: int, seed: int) -> List[Dict[str, torch.Tensor]]:
    """``size`` training pairs read through the training stream of the cache, as micro-batches."""
    from torch.utils.data import DataLoader

    from dinotxt.data.feature_cache import CachedFeatureStream
    from dinotxt.data.stream import collate_image_text

    stream = CachedFeatureStream(cfg.cache.path, tokenizer=tokenizer, seed=seed, shuffle_buffer=256, rank=0,
                                 world_size=1)
    it = iter(DataLoader(stream, batch_size=micro, num_workers=0, collate_fn=collate_image_text))
    keep = ("tokens", "pooled", "text")
    return [{k: v for k, v in next(it).items() if k in keep} for _ in range(size // micro)]


def whole(micro_batches: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


class Row:
    """One configuration's model and optimizer; ``step(batch)`` is one exact optimizer step."""

    def __init__(self, name: str, cfg, grad_cache: bool, block: Optional[int]):
        import dinotxt
        from dinotxt.train.loss import ClipLoss
        from dinotxt.train.optim import build_optimizer

        self.name, self.grad_cache = name, grad_cache
        torch.manual_seed(0)
        self.model = dinotxt.create_model(cfg.model).train()
        o = cfg.optim
        self.opt, _ = build_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps, 1, 10**6)
        self.loss_fn = ClipLoss(block)

    def step(self, micro_batches: List[Dict[str, torch.Tensor]], batch: Dict[str, torch.Tensor], seed: int) -> float:
        from dinotxt.data.stream import mix_seed
        from dinotxt.train.gradcache import gradcache_backward
        from dinotxt.train.step import contrastive_loss

        self.opt.zero_grad(set_to_none=True)
        if self.grad_cache:
            seeds = [mix_seed(seed, i) for i in range(len(micro_batches))]
            loss = gradcache_backward(self.model, self.loss_fn, micro_batches, seeds)
        else:
            torch.manual_seed(mix_seed(seed, 0))
            loss = contrastive_loss(self.model, self.loss_fn, batch)
            loss.backward()
            loss = loss.detach()
        self.opt.step()
        self.model.clamp_logit_scale_()
        return float(loss)


def loss_memory(dim: int, size: int, block: Optional[int]) -> int:
    """Peak resident bytes of the loss alone, forward and backward, on ``size`` random embeddings."""
    from dinotxt.train.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.randn(size, dim, generator=g).requires_grad_()
    txt = torch.randn(size, dim, generator=g).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)

    def run():
        ClipLoss(block)(img, txt, scale).backward()

    return measure(run, True)[1]


def estimate(measured: Dict[int, int], size: int, quadratic: bool) -> Optional[float]:
    """Bytes at ``size`` extrapolated from the largest measured size (quadratic for dense logits); with
    nothing measured, a dense loss's logits, log-softmax and gradients (six fp32 (B, B) matrices)."""
    if not measured:
        return 6 * 4 * size * size if quadratic else None
    base = max(measured)
    return measured[base] * (size / base) ** (2 if quadratic else 1)


# --------------------------------------------------------------------------- main


def fmt_mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,4096,16384,65536", help="global batches (multiples of --micro)")
    p.add_argument("--micro", type=int, default=256, help="GradCache micro-batch")
    p.add_argument("--block", type=int, default=4096, help="tile side of the blocked loss")
    p.add_argument("--head", choices=sorted(HEADS), default="lit")
    p.add_argument("--steps", type=int, default=1, help="timed steps per row and size (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row, at the smallest size")
    p.add_argument("--max-gib", type=float, default=20.0, help="skip cells whose memory would exceed this")
    p.add_argument("--cache-samples", type=int, default=1024, help="images in the feature cache (cycled)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--rows", default=None, help="comma-separated subset of row names")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if MMAP_ENV not in os.environ:  # freed tensors must leave the resident set for the peak to mean live memory
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, MMAP_ENV: "131072"})
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if any(s % args.micro for s in sizes):
        p.error(f"every size must be a multiple of --micro {args.micro}")
    rows = row_names(args.micro)
    names = [n.strip() for n in args.rows.split(",")] if args.rows else list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {list(rows)}")
    no_memory = peak_memory_supported()
    memory = no_memory is None
    limit = args.max_gib * 2**30

    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    print(f"[bench] {cpu}, {args.threads} threads; sizes {sizes}, micro-batch {args.micro}, loss block {args.block}, "
          f"{args.head} head", flush=True)
    if no_memory:
        print(f"[bench] {no_memory}")
    results: Dict = {"cpu": cpu, "threads": args.threads, "micro": args.micro, "block": args.block, "head": args.head,
                     "cells": {}, "loss_memory": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="dinotxt_large_batch_") as tmp:
        cfg, tokenizer = build(Path(tmp), args.head, args.cache_samples)
        built = {n: Row(n, cfg, *(rows[n][0], args.block if rows[n][1] else None)) for n in names}
        dim = built[names[0]].model.embed_dim
        print(f"[bench] embeddings {dim}-d; text tower {cfg.model.text.depth} x {cfg.model.text.width}, "
              f"context {cfg.model.text.context_length}", flush=True)

        # the loss alone
        loss_mem: Dict[str, Dict[int, int]] = {"dense": {}, "blocked": {}}
        for size in sizes:
            for kind, block in (("dense", None), ("blocked", args.block)):
                est = estimate(loss_mem[kind], size, kind == "dense")
                if not memory:
                    continue
                if est is not None and est > limit:
                    results["skipped"][f"{kind} loss {size}"] = f"estimated {est / 2**30:.1f} GiB > {args.max_gib:g} GiB"
                    continue
                loss_mem[kind][size] = loss_memory(dim, size, block)
        results["loss_memory"] = loss_mem

        step_mem: Dict[str, Dict[int, int]] = {n: {} for n in names}
        cells: Dict[str, Dict[int, Dict]] = {n: {} for n in names}
        for i, size in enumerate(sizes):
            micro_batches = read_global_batch(cfg, tokenizer, size, args.micro, seed=size)
            batch = whole(micro_batches)
            from dinotxt.models.text_tower import trim_padding

            print(f"[bench] global batch {size}: captions use {trim_padding(batch['text']).shape[1]} token columns in one "
                  f"pass, {statistics.mean(trim_padding(mb['text']).shape[1] for mb in micro_batches):.1f} per "
                  f"micro-batch on average", flush=True)
            active = []
            for n in names:
                grad_cache, blocked = rows[n]
                # activations grow linearly; a dense loss over the global batch quadratically
                est = estimate(step_mem[n], size, quadratic=not blocked)
                if est is not None and est > limit:
                    results["skipped"][f"{n} {size}"] = f"estimated {est / 2**30:.1f} GiB > {args.max_gib:g} GiB"
                    print(f"  {n}: skipped at {size} (estimated {est / 2**30:.1f} GiB > {args.max_gib:g} GiB)", flush=True)
                    continue
                active.append(n)
            if i == 0:
                for n in active:
                    for w in range(args.warmup):
                        built[n].step(micro_batches, batch, seed=10**6 + w)
            times: Dict[str, List[float]] = {n: [] for n in active}
            for s in range(args.steps):  # rows take turns, so machine noise hits them alike
                for n in active:
                    seconds, peak = measure(lambda: built[n].step(micro_batches, batch, seed=s), memory)
                    times[n].append(seconds)
                    if peak is not None:
                        step_mem[n][size] = max(step_mem[n].get(size, 0), peak)
                    print(f"  {n}: {seconds:.2f} s, +{fmt_mib(peak)} MiB", flush=True)
            for n in active:
                cells[n][size] = {"step_s": statistics.median(times[n]), "peak_bytes": step_mem[n].get(size)}
            del micro_batches, batch
    results["cells"] = cells

    print()
    print(f"{'global batch':>12}  {'row':<26}{'s / step':>10}{'x ' + BASELINE:>24}{'step peak MiB':>15}"
          f"{'loss peak MiB':>15}")
    for size in sizes:
        base = cells.get(BASELINE, {}).get(size)
        for n in names:
            cell = cells[n].get(size)
            kind = "blocked" if rows[n][1] else "dense"
            lm = fmt_mib(results["loss_memory"][kind].get(size))
            if cell is None:
                print(f"{size:>12}  {n:<26}{'skipped: ' + results['skipped'].get(f'{n} {size}', ''):>40}")
                continue
            ratio = f"{cell['step_s'] / base['step_s']:.2f}x" if base else "-"
            print(f"{size:>12}  {n:<26}{cell['step_s']:>10.2f}{ratio:>24}{fmt_mib(cell['peak_bytes']):>15}{lm:>15}")
    print()
    print(f"{'global batch':>12}{'dense logits MiB':>18}{'dense loss MiB':>16}{'blocked loss MiB':>18}")
    for size in sizes:
        logits = 2 * size * size * 4  # the two fp32 (B, B) logit matrices of one process
        print(f"{size:>12}{logits / 2**20:>18.0f}{fmt_mib(results['loss_memory']['dense'].get(size)):>16}"
              f"{fmt_mib(results['loss_memory']['blocked'].get(size)):>18}")
    results["dense_logits_bytes"] = {s: 2 * s * s * 4 for s in sizes}

    print()
    blocked_16k = results["loss_memory"]["blocked"].get(16384)
    if blocked_16k is not None:
        print(f"target: blocked loss at 16384 holds {blocked_16k / 2**20:.0f} MiB of loss memory (< 1024 MiB): "
              f"{'met' if blocked_16k < 2**30 else 'NOT met'}")
    for gc_name, one_name in ((f"GradCache {args.micro}, blocked", "one pass, blocked loss"),
                              (f"GradCache {args.micro}, dense", BASELINE)):
        for size in sizes:
            a, b = cells.get(gc_name, {}).get(size), cells.get(one_name, {}).get(size)
            if a and b:
                r = a["step_s"] / b["step_s"]
                print(f"target: {gc_name} at {size}: {r:.2f}x the time of '{one_name}' (<= 1.4x): "
                      f"{'met' if r <= 1.4 else 'NOT met'}")
    print(f"(median of {args.steps} step(s) per cell after {args.warmup} warm-up step(s); memory: peak resident set "
          f"added by the step)")
    if args.json:
        from dinotxt.utils.fileio import atomic_write_json

        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
