"""Training throughput: open_clip's LiT (locked image tower) against dinotxt, online and
from the feature cache, on the same configuration, measured in one run.

The configuration (dinotxt issue 6): a frozen DINOv2-architecture ViT-S/14 with 4 registers
(timm ``vit_small_patch14_reg4_dinov2``, random weights), 112 px, a text tower of 6 layers x
256 wide (4 heads, context 77, exact-GELU MLP 4x), batch 64, AdamW (same parameter groups)
and the symmetric InfoNCE loss. Every row feeds the same images and the same CLIP-BPE token
ids (vocabulary 49,408, padded to 77), and runs the same number of steps.

Rows:
  open_clip LiT       open_clip ``CLIP`` from a custom model config whose vision tower is the
                      timm model above (CLS token, no projection), ``lock_image_tower()``.
                      open_clip's TimmModel does not pass the image size to timm, so its trunk
                      is rebuilt at 112 px with the same name and arguments.
  dinotxt LiT         the like-for-like row: CLS only, 0 head blocks, text projects to 384.
  dinotxt dino.txt    the dino.txt head: 2 trainable blocks, [CLS, mean patches] (768-d), drop path
                      0.3 in the official batch-subset form (each branch on floor(0.7 B) samples).
  ... per-sample dp   the same head with per-sample drop path over all B samples (the form dinotxt
                      used before; vision_head.drop_path_mode=per_sample): the speed-up of the
                      official form, measured in the same run.
  ... online          frozen backbone in fp32 under inference mode, images in memory.
  ... online bf16     the same with ``trainer.backbone_autocast=bfloat16`` (not bit-exact).
  ... cached          tokens read from a real feature cache (``dinotxt cache``) through the
                      training stream (memory-mapped fp16 shards), inside the timed loop.

Timing: the rows are interleaved (a few steps of each, in turn, for several rounds) so a
noisy shared machine slows them alike; images/s is the median over rounds. Peak memory is
the peak resident set of a fresh process running only that row (CPU), or the peak CUDA
allocation (GPU). On a GPU the script also reports the model FLOPs utilisation (MFU) of
the paper configuration (ViT-L/14 reg4 frozen at 224 px, 2 vision blocks, text 1280 x 24,
bf16 autocast), online and cached; FLOPs come from ``dinotxt.train.flops``.

    python bench/train_throughput.py                  # the table (about 5 min on 2 CPU cores)
    python bench/train_throughput.py --steps 6 --rounds 5 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

VIT = "vit_small_patch14_reg4_dinov2"
TEXT = {"vocab_size": 49408, "context_length": 77, "width": 256, "depth": 6, "heads": 4}
HEADS = {
    "lit": {"num_blocks": 0, "use_patch_tokens": False, "final_norm": False, "drop_path": 0.0},
    "dinotxt": {"num_blocks": 2, "use_patch_tokens": True, "final_norm": True, "drop_path": 0.3},
    # the same head with the per-sample drop path dinotxt used before following the official batch-subset form
    "dinotxt_per_sample": {"num_blocks": 2, "use_patch_tokens": True, "final_norm": True, "drop_path": 0.3,
                           "drop_path_mode": "per_sample"},
}
CACHES = {"lit": "lit", "dinotxt": "dinotxt", "dinotxt_per_sample": "dinotxt"}  # heads sharing a cache
# row name -> (kind, head, variant)
ROWS = {
    "open_clip LiT (locked tower)": ("open_clip", "lit", None),
    "dinotxt LiT online": ("dinotxt", "lit", "online"),
    "dinotxt LiT online bf16 backbone": ("dinotxt", "lit", "bf16"),
    "dinotxt LiT cached (pooled fp16)": ("dinotxt", "lit", "cached"),
    "dinotxt dino.txt head online": ("dinotxt", "dinotxt", "online"),
    "dinotxt dino.txt head cached (fp16)": ("dinotxt", "dinotxt", "cached"),
    "dinotxt dino.txt head online per-sample dp": ("dinotxt", "dinotxt_per_sample", "online"),
    "dinotxt dino.txt head cached per-sample dp": ("dinotxt", "dinotxt_per_sample", "cached"),
}
BASELINE = "open_clip LiT (locked tower)"
LR, WD, BETAS, EPS = 1e-4, 1e-4, (0.9, 0.99), 1e-8


# --------------------------------------------------------------------------- data


def clip_tokenize(captions: List[str]) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(captions, context_length=TEXT["context_length"])


def make_world(work: Path, samples: int) -> Path:
    from dinotxt.data.world import write_world

    root = work / "world"
    write_world(str(root), num_train=samples, num_eval=0, size=128, samples_per_shard=max(64, samples // 4), seed=0)
    return root / "train"


def load_batch(train_dir: Path, batch: int, size: int):
    """``batch`` decoded, randomly cropped images and their captions, held in memory."""
    from dinotxt.data.sources import expand_shards, iter_tar_samples
    from dinotxt.data.stream import sample_image, seeded_transform
    from dinotxt.models.transforms import train_transform

    transform = train_transform(size, (0.5, 1.0), 0.5)
    images, captions = [], []
    for shard in expand_shards(str(train_dir)):
        for sample in iter_tar_samples(shard, {}):
            images.append(seeded_transform(transform, sample_image(sample), len(images)))
            captions.append(sample["txt"].decode())
            if len(images) == batch:
                return torch.stack(images), captions
    raise RuntimeError("not enough samples for one batch")


def dinotxt_config(train_dir: Path, head: str, cache_dir: Optional[Path], size: int, batch: int):
    from dinotxt.config import load_train_config

    overrides = [f"model.backbone.name={VIT}", f"model.backbone.img_size={size}", f"data.train={train_dir}",
                 "data.crop_scale=[0.5,1.0]", "data.num_workers=0", f"data.batch_size={batch}",
                 f"cache.batch_size={batch}", "data.world.generate=false"]
    overrides += [f"model.vision_head.{k}={v}" for k, v in HEADS[head].items()]
    overrides += [f"model.text.{k}={v}" for k, v in TEXT.items()]
    if cache_dir is not None:
        overrides += [f"cache.path={cache_dir}", f"cache.tokens={'pooled' if head == 'lit' else 'all'}"]
    return load_train_config(None, ["model.arch=dinotxt_vits14_reg4", *overrides])


def build_caches(work: Path, train_dir: Path, size: int, batch: int) -> None:
    from dinotxt.features.build_cache import build_cache

    for head in sorted(set(CACHES.values())):
        cfg = dinotxt_config(train_dir, head, work / f"cache_{head}", size, batch)
        summary = build_cache(cfg, log=lambda *_: None)
        print(f"  cache for the {head} head: {summary['samples']} samples, tokens {summary['token_shape']}, "
              f"{summary['bytes'] / 2**20:.1f} MiB, built at {summary['images_per_s'] or 0:.1f} images/s", flush=True)


# --------------------------------------------------------------------------- the trainers


class Row:
    """One configuration: ``step()`` fetches a batch and runs forward, backward and AdamW."""

    def __init__(self, name: str, work: Path, train_dir: Path, images: torch.Tensor, ids: torch.Tensor,
                 size: int, device: torch.device):
        self.name = name
        kind, head, variant = ROWS[name]
        self.device = device
        self.images, self.ids = images.to(device), ids.to(device)
        torch.manual_seed(0)
        if kind == "open_clip":
            self._init_open_clip(work, size)
        else:
            self._init_dinotxt(work, train_dir, head, variant, size)

    def _optimizer(self, model: torch.nn.Module):
        from dinotxt.train.optim import param_groups

        return torch.optim.AdamW(param_groups(model.named_parameters(), WD, verbose=False), lr=LR, betas=BETAS, eps=EPS)

    def _init_open_clip(self, work: Path, size: int) -> None:
        import open_clip
        import timm

        config = {"embed_dim": 384,
                  "vision_cfg": {"image_size": size, "timm_model_name": VIT, "timm_model_pretrained": False,
                                 "timm_pool": "token", "timm_proj": "none"},
                  "text_cfg": {"context_length": TEXT["context_length"], "vocab_size": TEXT["vocab_size"],
                               "width": TEXT["width"], "heads": TEXT["heads"], "layers": TEXT["depth"]}}
        path = work / "open_clip_config" / "dinov2-vits14-reg4-lit.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
        model = open_clip.create_model("dinov2-vits14-reg4-lit", pretrained=None, output_dict=True)
        # TimmModel builds the trunk at timm's default 518 px: rebuild it at the benchmark size
        model.visual.trunk = timm.create_model(VIT, pretrained=False, num_classes=0, global_pool="token", img_size=size)
        model.lock_image_tower()
        self.model = model.to(self.device).train()
        self.loss_fn = open_clip.ClipLoss()
        self.opt = self._optimizer(self.model)

    def _init_dinotxt(self, work: Path, train_dir: Path, head: str, variant: str, size: int) -> None:
        import dinotxt
        from dinotxt.train.loss import ClipLoss

        cache_dir = work / f"cache_{CACHES[head]}" if variant == "cached" else None
        cfg = dinotxt_config(train_dir, head, cache_dir, size, self.images.shape[0])
        self.model = dinotxt.create_model(cfg.model).to(self.device).train()
        self.loss_fn = ClipLoss()
        self.opt = self._optimizer(self.model)
        self.autocast = "bfloat16" if variant == "bf16" else None
        self.batches = None
        if cache_dir is not None:
            from torch.utils.data import DataLoader

            from dinotxt.data.feature_cache import CachedFeatureStream
            from dinotxt.data.stream import collate_image_text

            stream = CachedFeatureStream(cache_dir, tokenizer=clip_tokenize, seed=0, shuffle_buffer=256, rank=0,
                                         world_size=1)
            self.batches = iter(DataLoader(stream, batch_size=self.images.shape[0], num_workers=0,
                                           collate_fn=collate_image_text))

    def step(self) -> None:
        if hasattr(self, "autocast"):
            self._step_dinotxt()
        else:
            self._step_open_clip()

    def _step_open_clip(self) -> None:
        out = self.model(self.images, self.ids)
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def _step_dinotxt(self) -> None:
        from dinotxt.train.step import contrastive_loss

        if self.batches is not None:
            raw = next(self.batches)
            key = "pooled" if "pooled" in raw else "tokens"
            batch = {key: raw[key].to(self.device, non_blocking=True), "text": raw["text"].to(self.device)}
        else:
            batch = {"image": self.images, "text": self.ids}
        loss = contrastive_loss(self.model, self.loss_fn, batch, self.autocast)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.clamp_logit_scale_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: List[Row], warmup: int, steps: int, rounds: int) -> Dict[str, List[float]]:
    """Images/s of each row per round; rows take turns so machine noise hits them alike."""
    for row in rows:
        for _ in range(warmup):
            row.step()
    rates: Dict[str, List[float]] = {row.name: [] for row in rows}
    for r in range(rounds):
        for row in rows:
            _sync(row.device)
            start = time.perf_counter()
            for _ in range(steps):
                row.step()
            _sync(row.device)
            rates[row.name].append(steps * row.images.shape[0] / (time.perf_counter() - start))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n.split(' (')[0]} {v[-1]:.1f}" for n, v in rates.items()),
              flush=True)
    return rates


# --------------------------------------------------------------------------- memory


def _status_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_probe(args) -> None:
    """Child process: build one row, run a few steps, print its peak memory as JSON.

    The peak is VmHWM (this process image's high-water RSS). ``getrusage``'s ru_maxrss would not
    do: Linux carries it across fork + exec, so every child would report the parent's size."""
    work, device = Path(args.work), torch.device(args.device)
    images, captions = load_batch(work / "world" / "train", args.batch, args.size)
    ids = clip_tokenize(captions)
    base = _status_mib("VmRSS")
    row = Row(args.memory_probe, work, work / "world" / "train", images, ids, args.size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        row.step()
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_rss_mib": peak, "base_rss_mib": base}))


def measure_memory(args, work: Path, name: str) -> Dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-probe", name, "--work", str(work), "--batch", str(args.batch),
           "--size", str(args.size), "--device", "cpu", "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {name!r} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- MFU (GPU)


def measure_mfu(device: torch.device, batch: int, steps: int, warmup: int, peak_flops: Optional[float],
                arch: str = "dinotxt_vitl14_reg4", overrides: Optional[Dict] = None, size: int = 224) -> List[Dict]:
    """MFU of the paper configuration (bf16 autocast), online and with cached tokens."""
    import dinotxt
    from dinotxt.train.loss import ClipLoss
    from dinotxt.models.text_tower import trim_padding
    from dinotxt.train.flops import train_step_flops
    from dinotxt.train.optim import build_optimizer
    from dinotxt.models.backbone import frozen_tokens
    from dinotxt.train.step import contrastive_loss

    from dinotxt.data.world import render_sample

    torch.manual_seed(0)
    model = dinotxt.create_model(arch, **(overrides or {})).to(device).train()
    opt, _ = build_optimizer(model, 7e-4, 1e-4, (0.9, 0.99), 1e-8, 1, 10**6)
    images = torch.randn(batch, 3, size, size, device=device)
    ids = clip_tokenize([render_sample(i, 32).caption for i in range(batch)]).to(device)
    text_len = trim_padding(ids).shape[1]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        tokens = frozen_tokens(model.backbone, images[:1])
    num_tokens = tokens.shape[1]
    results = []
    for cached in (False, True):
        if cached:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                batch_in = {"tokens": frozen_tokens(model.backbone, images).to(torch.float16), "text": ids}
        else:
            batch_in = {"image": images, "text": ids}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = contrastive_loss(model, ClipLoss(), batch_in)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.clamp_logit_scale_()

        for _ in range(warmup):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        seconds = (time.perf_counter() - start) / steps
        flops = train_step_flops(model, batch, num_tokens, text_len, cached=cached)
        achieved = flops["total"] / seconds
        results.append({
            "setting": f"{arch} {size}px bf16, batch {batch}, {'cached tokens' if cached else 'online'}",
            "step_s": seconds, "images_per_s": batch / seconds, "tflops_per_step": flops["total"] / 1e12,
            "achieved_tflops": achieved / 1e12, "mfu": achieved / peak_flops if peak_flops else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "text_len": text_len, "tokens_per_image": num_tokens,
        })
    return results


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--rows", default=None, help="comma-separated subset of row names (default: all)")
    p.add_argument("--skip-memory", action="store_true", help="do not measure peak memory per row")
    p.add_argument("--mfu", choices=["auto", "yes", "no"], default="auto",
                   help="MFU of the paper configuration (auto: on a GPU)")
    p.add_argument("--mfu-batch", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: known GPUs)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_probe:
        memory_probe(args)
        return {}
    device = torch.device(args.device)
    names = [n.strip() for n in args.rows.split(",")] if args.rows else list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; rows: {list(ROWS)}")

    with tempfile.TemporaryDirectory(prefix="dinotxt_bench_") as tmp:
        work = Path(tmp)
        print(f"[bench] {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}), "
              f"batch {args.batch}, {args.size} px, {args.steps} steps x {args.rounds} rounds per row", flush=True)
        print("[bench] writing the data (demo world) and the feature caches", flush=True)
        train_dir = make_world(work, max(4 * args.batch, 256))
        images, captions = load_batch(train_dir, args.batch, args.size)
        ids = clip_tokenize(captions)
        if any(ROWS[n][2] == "cached" for n in names):
            build_caches(work, train_dir, args.size, args.batch)
        rows = [Row(n, work, train_dir, images, ids, args.size, device) for n in names]
        from dinotxt.models.text_tower import trim_padding

        print(f"[bench] captions use {trim_padding(ids).shape[1]} of {ids.shape[1]} token columns in this batch", flush=True)
        rates = time_rows(rows, args.warmup, args.steps, args.rounds)
        del rows
        memory = {}
        if not args.skip_memory and device.type == "cpu":
            print("[bench] peak memory: one fresh process per row", flush=True)
            memory = {n: measure_memory(args, work, n) for n in names}

    median = {n: statistics.median(v) for n, v in rates.items()}
    base = median.get(BASELINE)
    print()
    print(f"{'row':<38}{'images/s':>10}{'x open_clip':>13}{'peak RSS MiB':>14}{'+ over import':>15}")
    for n in names:
        ratio = f"{median[n] / base:.2f}x" if base else "-"
        mem = memory.get(n)
        peak = f"{mem['peak_rss_mib']:.0f}" if mem else "-"
        over = f"{mem['peak_rss_mib'] - mem['base_rss_mib']:.0f}" if mem else "-"
        print(f"{n:<38}{median[n]:>10.1f}{ratio:>13}{peak:>14}{over:>15}")
    for variant in ("online", "cached"):  # the official batch-subset drop path against per-sample, same run
        new = next((n for n in names if ROWS[n][1:] == ("dinotxt", variant)), None)
        old = next((n for n in names if ROWS[n][1:] == ("dinotxt_per_sample", variant)), None)
        if new and old:
            print(f"dino.txt head {variant}: batch-subset drop path {median[new] / median[old]:.2f}x the per-sample form")
    spread = max((max(v) - min(v)) / statistics.median(v) for v in rates.values())
    print(f"(median of {args.rounds} interleaved rounds; largest round-to-round spread {100 * spread:.0f}% of the median)")
    results = {"device": str(device), "threads": args.threads, "batch": args.batch, "size": args.size,
               "steps": args.steps, "rounds": args.rounds, "images_per_s": median, "rounds_images_per_s": rates,
               "ratio_vs_open_clip": {n: median[n] / base for n in names} if base else None, "memory": memory}

    if args.mfu == "yes" or (args.mfu == "auto" and device.type == "cuda"):
        from dinotxt.train.flops import peak_bf16_flops

        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_bf16_flops(device)
        mfu_rows = measure_mfu(device, args.mfu_batch, steps=10, warmup=3, peak_flops=peak)
        print()
        print(f"{'paper configuration':<60}{'images/s':>10}{'TFLOP/step':>12}{'TFLOP/s':>10}{'MFU':>8}{'mem GiB':>9}")
        for r in mfu_rows:
            mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            mem_s = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{r['setting']:<60}{r['images_per_s']:>10.1f}{r['tflops_per_step']:>12.2f}"
                  f"{r['achieved_tflops']:>10.1f}{mfu_s:>8}{mem_s:>9}")
        print(f"(peak {peak / 1e12:.1f} TFLOP/s dense bf16)" if peak else "(unknown peak: pass --peak-tflops for MFU)")
        results["mfu"] = mfu_rows
    if args.json:
        from dinotxt.utils.fileio import atomic_write_json

        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
