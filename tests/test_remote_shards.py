"""Shards from anywhere: fsspec URLs (a local HTTP server on 127.0.0.1 serving the procedural world's
shards) and ``pipe:COMMAND`` read exactly like the files, with the same reader split, seeded
stream and exact resume; a failing command, an unreachable URL and a missing package are one-line
errors; a connection dropped mid-shard counts as a corrupt shard."""
import functools
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dinotxt.data.sources import ShardCommandError, expand_shards, iter_tar_samples, shard_name, shard_sizes
from dinotxt.data.stream import ImageTextStream, collate_image_text
from dinotxt.data.world import write_split
from dinotxt.models.transforms import train_transform

ROOT = Path(__file__).parents[1]


class _Quiet(SimpleHTTPRequestHandler):  # python -m http.server: no Range support
    def log_message(self, *args):
        pass


def _serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three shards of 16 captioned images, on disk and over HTTP: (folder, local shards, base URL)."""
    root = tmp_path_factory.mktemp("served")
    shards = write_split(root / "train", 48, seed=0, size=32, samples_per_shard=16)
    server, base = _serve(functools.partial(_Quiet, directory=str(root)))
    yield root, shards, base
    server.shutdown()


def _urls(base):
    return f"{base}/train/{{000000..000002}}.tar"


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_urls_expand_to_the_same_shards_names_and_sizes(world):
    root, shards, base = world
    urls = expand_shards(_urls(base))
    assert urls == [f"{base}/train/{Path(s).name}" for s in shards]
    assert expand_shards(f"{base}/train/") == urls  # a served folder is listed
    assert expand_shards(f"{base}/train/00000[01].tar") == urls[:2]
    assert expand_shards([f"file://{shards[0]}", urls[1]]) == [shards[0], urls[1]]
    assert [shard_name(u) for u in urls] == [Path(s).name for s in shards]
    assert shard_sizes(urls) == [os.path.getsize(s) for s in shards]


def test_http_stream_equals_the_local_stream_per_reader_and_resumes_exactly(world):
    _, shards, base = world
    urls = expand_shards(_urls(base))
    for rank in range(2):  # two readers: one shard each, and the left-over shard split sample by sample
        kw = dict(shuffle_buffer=5, rank=rank, world_size=2, seed=3, transform=train_transform(16, (0.5, 1.0)))
        local = _take(ImageTextStream(shards=shards, **kw), 30)  # crosses the end of a pass (24 per reader)
        remote = _take(ImageTextStream(shards=urls, **kw), 30)
        assert [s["caption"] for s in remote] == [s["caption"] for s in local]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(remote, local))
        resumed = _take(ImageTextStream(shards=urls, start_positions={rank: remote[11]["position"]}, **kw), 18)
        assert [s["caption"] for s in resumed] == [s["caption"] for s in local[12:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, local[12:]))


def test_http_loader_with_workers_resumes_the_exact_batch_order(world):
    """Two dataloader workers (each its own fsspec client, after fork): a resumed loader continues the
    batches of the uninterrupted one, crops included."""
    _, shards, base = world
    urls = expand_shards(_urls(base))

    def loader(spec, positions=None, batches=0):
        ds = ImageTextStream(shards=spec, shuffle_buffer=3, seed=5, rank=0, world_size=1,
                             transform=train_transform(16), start_positions=positions, reader_offset=batches % 2)
        return iter(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_image_text))

    it = loader(shards)
    full = [next(it) for _ in range(9)]
    it = loader(urls)
    assert [b["caption"] for b in (next(it) for _ in range(9))] == [b["caption"] for b in full]
    positions = {}
    for batch in full[:4]:
        for reader, pos in batch["positions"].items():
            positions[reader] = max(positions.get(reader, 0), pos)
    it = loader(urls, positions, batches=4)
    resumed = [next(it) for _ in range(5)]
    assert [b["caption"] for b in resumed] == [b["caption"] for b in full[4:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[4:]))


def test_a_server_without_range_requests_is_streamed(world, monkeypatch):
    """fsspec reads HTTP in blocks by range requests; python -m http.server ignores them, so past the first
    block the shard continues as one streamed GET."""
    import fsspec

    _, shards, base = world
    monkeypatch.setitem(fsspec.config.conf, "http", {"block_size": 4096})  # shards are ~80 kB: many blocks
    errors = {}
    assert list(iter_tar_samples(f"{base}/train/{Path(shards[1]).name}", errors)) == list(iter_tar_samples(shards[1], {}))
    assert errors == {}


def test_pipe_cat_equals_reading_the_file(world):
    _, shards, _ = world
    for shard in shards:
        assert list(iter_tar_samples(f"pipe:cat {shlex.quote(shard)}", {})) == list(iter_tar_samples(shard, {}))
    folder = Path(shards[0]).parent
    pipes = expand_shards(f"pipe:cat {folder}/{{000000..000002}}.tar")
    assert pipes == [f"pipe:cat {s}" for s in shards] and [shard_name(p) for p in pipes] == [Path(s).name for s in shards]
    kw = dict(shuffle_buffer=4, rank=0, world_size=1, seed=1)
    assert [s["caption"] for s in _take(ImageTextStream(shards=pipes, **kw), 20)] == \
           [s["caption"] for s in _take(ImageTextStream(shards=shards, **kw), 20)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command, status", [("cat /nonexistent/shard.tar", 1), ("exit 3", 3),
                                             ("head -c 3000 {shard}; exit 2", 2),  # data, then a failure
                                             ("cat {shard}; exit 4", 4)])  # a whole tar, then a failure
def test_a_failing_pipe_command_is_a_one_line_error_naming_it_and_its_status(world, command, status):
    command = command.format(shard=world[1][0])
    with pytest.raises(ShardCommandError) as e:
        list(iter_tar_samples(f"pipe:{command}", {}))
    assert str(e.value) == f"shard command exited with status {status}: {command}"


@pytest.mark.timeout(60)
def test_a_pipe_error_in_a_loader_worker_reaches_the_command_line_as_its_own_line(world):
    from dinotxt.cli import error_line

    loader = DataLoader(ImageTextStream(shards=["pipe:exit 7"], rank=0, world_size=1), batch_size=2, num_workers=1,
                        collate_fn=collate_image_text)
    with pytest.raises(ShardCommandError) as e:
        next(iter(loader))
    assert str(e.value).startswith("Caught ShardCommandError in DataLoader worker process 0")
    assert error_line(e.value) == "shard command exited with status 7: exit 7"


def test_a_pipe_left_early_is_stopped(world, tmp_path):
    """A reader that stops inside a shard (end of the run, a full shuffle buffer) ends the command."""
    pid_file = tmp_path / "pid"
    samples = iter_tar_samples(f"pipe:echo $$ > {pid_file}; cat {world[1][0]}; sleep 30", {})
    next(samples)
    samples.close()
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_unreachable_or_missing_urls_and_missing_packages_are_one_line_errors(world, monkeypatch):
    _, _, base = world
    with socket_closed() as port:
        with pytest.raises(FileNotFoundError, match=rf"^shard not found or unreachable: http://127.0.0.1:{port}/a/"
                                                    r"000.tar \(ClientConnectorError: .*\); check pool.data$"):
            expand_shards(f"http://127.0.0.1:{port}/a/{{000..009}}.tar", key="pool.data")
    with pytest.raises(FileNotFoundError, match=r"^shard not found or unreachable: .*/train/000009.tar "
                                                r"\(ClientResponseError: 404.*; check data.train$"):
        expand_shards(f"{base}/train/{{000009..000010}}.tar")
    with pytest.raises(FileNotFoundError, match=r"^no .tar shards match .*/nothing/; check data.train$"):
        expand_shards(f"{base}/nothing/")
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(ImportError, match=r"^s3:// shards need the s3fs package: pip install s3fs "
                                          r"\(data.train=s3://bucket/train/000.tar\)$"):
        expand_shards("s3://bucket/train/{000..001}.tar")
    with pytest.raises(ValueError, match=r"^cannot read nope://x/0.tar: Protocol not known: nope; check data.train$"):
        expand_shards("nope://x/0.tar")


class socket_closed:
    """A 127.0.0.1 port nothing listens on."""

    def __enter__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc):
        return False


def test_a_connection_dropped_mid_shard_counts_as_a_corrupt_shard(world):
    _, shards, _ = world
    data = Path(shards[0]).read_bytes()

    class Drop(BaseHTTPRequestHandler):  # announces the whole shard, sends 60% of it, hangs up
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._reply(body=False)

        def do_GET(self):
            self._reply(body=True)

        def _reply(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data[: len(data) * 3 // 5])
                self.close_connection = True

    server, base = _serve(Drop)
    try:
        errors = {}
        assert list(iter_tar_samples(f"{base}/000000.tar", errors)) == [] and errors == {"corrupt_shard": 1}
        stream = ImageTextStream(shards=[f"{base}/000000.tar", shards[1]], shuffle_buffer=0, rank=0, world_size=1)
        samples = _take(stream, 16)  # the intact shard's samples still come
        assert {s["key"] for s in samples} == {s["__key__"] for s in iter_tar_samples(shards[1], {})}
        assert sum(s["skipped"].get("corrupt_shard", 0) for s in samples) == 1
    finally:
        server.shutdown()


def test_served_pool_and_cache_source_keep_their_sample_ids(world):
    """pool.data / the cache builder walk URLs into the same units, sample ids and source fingerprint."""
    from omegaconf import OmegaConf

    from curation.config import PoolConfig
    from dinotxt.data.units import data_units, iter_unit

    _, shards, base = world
    fmt = OmegaConf.structured(PoolConfig)
    local, remote = data_units(shards, fmt, 100, key="pool.data"), data_units(_urls(base), fmt, 100, key="pool.data")
    assert [u.name for u in remote] == [u.name for u in local]
    for a, b in zip(local, remote):
        assert [(s.uid, s.caption, s.image) for s in iter_unit(a, fmt, {})] == \
               [(s.uid, s.caption, s.image) for s in iter_unit(b, fmt, {})]
    from dinotxt.data.feature_cache import source_fingerprint

    fp = lambda spec: source_fingerprint(OmegaConf.create({"data": {"train": spec}}))  # noqa: E731
    assert fp(_urls(base)) == fp(str(Path(shards[0]).parent))


def test_retrieval_reads_served_eval_shards(world):
    from dinotxt.evaluation.datasets import retrieval_dataset

    _, shards, base = world
    local, remote = retrieval_dataset("shards", str(Path(shards[0]).parent)), retrieval_dataset("shards", f"{base}/train/")
    assert len(remote) == len(local) == 48
    assert [(i.name, i.captions, i.image) for i in remote.items] == [(i.name, i.captions, i.image) for i in local.items]


# ------------------------------------------------------------------------------------------ end to end

def _cli(*args):
    return [sys.executable, "-m", "dinotxt.cli", "train", str(ROOT / "recipes" / "debug.yaml"), *args]


def _ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_training_over_http_killed_and_resumed_ends_with_the_weights_of_a_local_run(tmp_path):
    """The debug recipe on local shards, uninterrupted, against the same shards served over HTTP in a run
    that is SIGKILLed mid-epoch and resumed: equal weights, so HTTP reads the same stream and resumes it exactly."""
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    common = ["optim.max_steps=24", "trainer.checkpoint_every_n_steps=4", "trainer.val_every_n_steps=0",
              "eval.zeroshot_dir=null", "data.world.num_train=96", "data.world.num_eval=0",
              "data.world.samples_per_shard=32", "data.batch_size=8", "data.num_workers=2",
              "model.vision_head.drop_path=0.2", "trainer.deterministic=true"]  # 12 steps per pass
    ref = subprocess.run(_cli(*common, "name=local"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    server, base = _serve(functools.partial(_Quiet, directory=str(tmp_path / "runs" / "debug_world")))
    try:
        http = [*common, "data.world.generate=false", f"data.train={base}/train/{{000000..000002}}.tar", "name=http"]
        ckpt = tmp_path / "runs" / "http" / "checkpoints" / "last.ckpt"
        proc = subprocess.Popen(_cli(*http), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if ckpt.is_file() and _ckpt_step(ckpt) >= 8:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before it could be killed"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
        step = _ckpt_step(ckpt)
        assert 8 <= step < 24 and step % 12 != 0
        resumed = subprocess.run(_cli("--resume", *http), cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        server.shutdown()
    a = load_file(str(tmp_path / "runs" / "local" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "http" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_on_an_unreachable_server_stops_before_training(tmp_path, monkeypatch, capsys):
    from dinotxt.cli import main

    monkeypatch.chdir(tmp_path)
    with socket_closed() as port:
        rc = main(["train", "debug", "data.world.generate=false", f"data.train=http://127.0.0.1:{port}/{{0..3}}.tar"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"dinotxt: error: shard not found or unreachable: http://127.0.0.1:{port}/0.tar")
