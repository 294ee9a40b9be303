"""The GPU check (``make gpu-check``): the paper configuration for a few steps on one CUDA device, every
speed option the official GPU runs rely on, plus faiss k-means on the GPU, in one printed table.

On a GPU (default): ViT-L/14 reg4 frozen (random weights: the check times the computation, the weights do not
change it), 2 head blocks, the official 1280 x 24 text tower, bf16 autocast, batch ``--batch``; each variant
(plain, ``trainer.compile=blocks``, ``trainer.activation_checkpointing=selective``, both) under DDP with one
process on NCCL, and under FSDP2 (``trainer.strategy=fsdp2``: ``fully_shard`` per block and per tower, bf16
parameters with fp32 gradient reduction), plain and with compile + selective checkpointing; images/s, MFU (``dinotxt.train.flops``), peak memory, and the bf16 loss against the fp32 loss
of the same batch; then faiss-gpu k-means on 1M x 2048 (when faiss has GPUs).

On a CPU (``--tiny``, and what the test suite runs so the script cannot rot): the same code at a tiny size
(a 1-block ViT, a 2-layer text tower), DDP on gloo, fp32 and bf16 autocast on the CPU, faiss-cpu k-means on
10k x 64 (FSDP2 in fp32 there: the bf16 parameter policy is a GPU setting).

    python bench/gpu_check.py            # one CUDA device (make gpu-check)
    python bench/gpu_check.py --tiny     # anywhere, seconds
"""
from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

PAPER = {"arch": "dinotxt_vitl14_reg4", "backbone": {"img_size": 224}, "text": {"vocab_size": 49408}}
TINY = {"arch": "dinotxt_demo", "backbone": {"img_size": 56, "kwargs": {"depth": 1, "embed_dim": 96, "num_heads": 2}},
        "text": {"width": 64, "depth": 2, "heads": 2, "vocab_size": 100, "context_length": 16}}
# (name, trainer.activation_checkpointing, trainer.compile, trainer.strategy)
VARIANTS = [("plain", None, False, "ddp"), ("compile blocks", None, "blocks", "ddp"),
            ("selective AC", "selective", False, "ddp"), ("compile + selective AC", "selective", "blocks", "ddp"),
            ("FSDP2", None, False, "fsdp2"), ("FSDP2 + compile + sel. AC", "selective", "blocks", "fsdp2")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process(device: torch.device) -> None:
    """A one-process group (NCCL on a GPU, gloo on a CPU), so DDP runs as it does on a cluster."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def build(spec: Dict, device: torch.device, checkpointing: Optional[str], compile_mode) -> torch.nn.Module:
    import dinotxt
    from omegaconf import OmegaConf

    from dinotxt.train.run import apply_speed_options

    torch.manual_seed(0)
    model = dinotxt.create_model(spec["arch"], backbone=spec["backbone"], text=spec["text"]).to(device).train()
    apply_speed_options(model, OmegaConf.create({"activation_checkpointing": checkpointing, "compile": compile_mode}))
    return model


def batch_for(model, batch: int, device: torch.device, text_len: int = 20):
    """Random images at the backbone's size and captions of ``text_len`` ids ending in end-of-text."""
    text_len = min(text_len, int(model.text.context_length))
    g = torch.Generator().manual_seed(1)
    size = int(model.backbone.img_size)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    vocab = int(model.text.vocab_size)
    ids = torch.randint(1, vocab - 1, (batch, text_len), generator=g)
    ids[:, -1] = vocab - 1  # the end-of-text token, the largest id
    return {"image": images, "text": ids.to(device)}


def loss_of(model, batch, bf16: bool, device: torch.device) -> torch.Tensor:
    """The InfoNCE of one batch through ``model``'s forward (a DDP wrapper's too, so its hooks run)."""
    from dinotxt.train.loss import build_loss

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(batch["image"], batch["text"])
        return build_loss()(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_variant(name: str, spec: Dict, device: torch.device, batch: int, steps: int, warmup: int,
                checkpointing: Optional[str], compile_mode, strategy: str = "ddp") -> Dict:
    """Time ``steps`` steps of one variant under DDP or FSDP2 (``strategy``); its bf16-vs-fp32 loss agreement on
    the first batch (before any wrapping: the same weights in both)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dinotxt.train.flops import mfu, peak_bf16_flops, train_step_flops
    from dinotxt.train.strategy import apply_fsdp2, sync_replicated_grads

    model = build(spec, device, checkpointing, compile_mode)
    data = batch_for(model, batch, device)
    with torch.no_grad():
        fp32, bf16 = float(loss_of(model, data, False, device)), float(loss_of(model, data, True, device))
    bf16_steps = device.type == "cuda"
    if strategy == "fsdp2":  # the towers' own forwards run the shards' gathers: the model's forward reaches them
        ddp = apply_fsdp2(model, precision="bf16-mixed" if bf16_steps else "32-true")
    else:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        loss = loss_of(ddp, data, bf16_steps, device)
        loss.backward()
        sync_replicated_grads(model)  # FSDP2: the temperature's gradient (DDP reduces it itself)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    per_step = sorted(times)[len(times) // 2]
    tokens = model.backbone.num_prefix_tokens + (model.backbone.img_size // model.backbone.patch_size) ** 2
    flops = train_step_flops(model, batch, tokens, int(data["text"].shape[1]))["total"]
    peak = peak_bf16_flops(device) if device.type == "cuda" else None
    return {"variant": name, "images_per_s": batch / per_step, "seconds_per_step": per_step,
            "mfu": mfu(flops, per_step, peak) if peak else None, "peak_mib": peak_memory_mib(device),
            "loss_fp32": fp32, "loss_bf16": bf16, "bf16_rel_diff": abs(bf16 - fp32) / max(abs(fp32), 1e-12)}


def faiss_kmeans(device: torch.device, tiny: bool) -> Dict:
    """faiss k-means (GPU when faiss has GPUs and a CUDA device is there): seconds per run."""
    try:
        import faiss
        import numpy as np
    except ImportError:
        return {"faiss": "not installed"}
    n, d, k = (10_000, 64, 16) if tiny else (1_000_000, 2048, 1024)
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    gpu = device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    start = time.perf_counter()
    km = faiss.Kmeans(d, k, niter=10, gpu=bool(gpu), seed=0, verbose=False)
    km.train(x)
    return {"faiss": f"{'GPU' if gpu else 'CPU'} k-means {n:,} x {d} -> {k}: {time.perf_counter() - start:.1f} s"}


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration on any device (the CPU check)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 128 on a GPU, 4 tiny)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variants", default="all", help="all, or a comma-separated subset of the variant names")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    tiny = args.tiny or device.type == "cpu"
    spec = TINY if tiny else PAPER
    batch = args.batch or (4 if tiny else 128)
    steps = args.steps or (2 if tiny else 10)
    init_single_process(device)
    wanted = [v for v in VARIANTS if args.variants == "all" or v[0] in args.variants.split(",")]
    rows = [run_variant(name, spec, device, batch, steps, 1 if tiny else 3, ac, comp, strategy)
            for name, ac, comp, strategy in wanted]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu-check on {where}: {spec['arch']}{' (tiny)' if tiny else ''}, batch {batch}, DDP / FSDP2 on "
          f"{dist.get_backend()}, {'bf16 autocast' if device.type == 'cuda' else 'fp32 steps'}")
    print(f"{'variant':<26}{'images/s':>10}{'s/step':>9}{'MFU':>7}{'peak MiB':>10}{'bf16 vs fp32 loss':>19}")
    for r in rows:
        mfu_text = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['variant']:<26}{r['images_per_s']:>10.1f}{r['seconds_per_step']:>9.3f}{mfu_text:>7}"
              f"{r['peak_mib']:>10.0f}{100 * r['bf16_rel_diff']:>18.2f}%")
    print(faiss_kmeans(device, tiny)["faiss"])
    dist.destroy_process_group()
    return rows


if __name__ == "__main__":
    main()
