"""Class-sharded distillation under torch.distributed (gloo, CPU): N ranks write byte for byte what one process
writes, for every registered method; a rank that dies loses only its class in flight, and a rerun with another
number of ranks finishes without recomputing committed classes."""

from __future__ import annotations

import atexit
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from conftest import TINY_DIT_N, assert_close_f32
from gendd.methods import available_methods

FT = {"steps": 1, "batch_size": 4}
OPTIONS = {
    "random": {}, "herding": {}, "kcenter": {}, "dit": {"num_steps": 2}, "mgd3": {"num_steps": 2},
    "d3hr": {"num_steps": 4, "inversion_steps": 2, "num_candidates": 8}, "d4m": {"num_steps": 2},
    "dm": {"iterations": 2}, "minimax": {"num_steps": 2, "finetune": FT}, "memory": {"num_steps": 2, "finetune": FT},
    "memory+mgd3": {"num_steps": 2, "finetune": FT},
}


def _worker(rank: int, size: int, root: str, out: str, methods: list[str], die_after: int | None,
            store: str) -> None:
    import torch

    torch.set_num_threads(1)  # every run the same thread count: the same float sums
    os.environ["GENDD_FINETUNE"] = str(Path(root) / "finetuned")
    if size > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=20))

        atexit.register(dist.destroy_process_group)  # left before exit: gloo can abort in teardown
    from conftest import make_dataset
    from gendd.backbone import tiny_backbone
    from gendd.cache import LatentCache
    from gendd.distributed import current_world
    from gendd.export import distill
    from gendd.methods import build_method

    if die_after is not None and rank == 1:
        import gendd.export as export

        commits = []
        real_commit = export.commit_dir

        def commit_then_die(part, final):
            real_commit(part, final)
            commits.append(final)
            if len(commits) == die_after:
                os._exit(3)  # killed right after committing a class

        export.commit_dir = commit_then_die
    ds = make_dataset(num_classes=5, per_class=6, size=12)
    bb = tiny_backbone(num_classes=5, image_size=16, channels=1, pad=2, vae_channels=(32, 32))
    for name in methods:
        m = build_method(name, **OPTIONS[name])
        cache = (LatentCache.build(ds, bb, Path(root) / "cache", m.encode_spec(), progress=False)
                 if m.needs_cache else None)
        with current_world().main_first():
            b = m.prepare(ds, bb, cache_dir=Path(root) / "cache", progress=False)
        distill(m, ds, 2, Path(out) / name, backbone=b, cache=cache, progress=False)


def _run(size: int, root: Path, out: Path, methods: list[str], die_after: int | None = None) -> list[int]:
    import uuid

    ctx = mp.get_context("spawn")
    store = str(root / f"pg-{uuid.uuid4().hex}")  # a fresh rendezvous file per run
    procs = [ctx.Process(target=_worker, args=(r, size, str(root), str(out), methods, die_after, store))
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and ".records" not in p.parts}


def _manifest(folder: Path) -> dict:
    """The manifest without wall-clock facts (timestamps, seconds at any depth), the run's root folder as
    ``<root>`` (fine-tuned backbones are recorded by path)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("created", "seconds", "seconds_total")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    root = str(folder.parent.parent)
    return strip(json.loads((folder / "manifest.json").read_text().replace(root, "<root>")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    assert _run(1, root, root / "out", sorted(OPTIONS)) == [0]
    return root / "out"


def test_every_registered_method_is_covered():
    assert set(available_methods()) - {"d3hr-regenerate"} == set(OPTIONS)


@pytest.mark.parametrize("size", [2, 3])
def test_n_ranks_write_what_one_process_writes(reference, tmp_path, size):
    assert _run(size, tmp_path, tmp_path / "out", sorted(OPTIONS)) == [0] * size
    for name in sorted(OPTIONS):
        one, many = reference / name, tmp_path / "out" / name
        assert _files(many) == _files(one), name
        assert _manifest(many) == _manifest(one), name
        assert _manifest(many)["complete"]


def test_a_dead_rank_loses_only_its_class_in_flight(reference, tmp_path):
    codes = _run(2, tmp_path, tmp_path / "out", ["dit"], die_after=1)
    assert codes[1] == 3 and codes[0] != 0  # rank 0 gives up at the barrier
    folder = tmp_path / "out" / "dit"
    done = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_dir() and p.name.startswith("c")}
    assert 1 <= len(done) < 5 and not any(p.name.startswith(".partial") for p in folder.iterdir())
    assert _run(3, tmp_path, tmp_path / "out", ["dit"]) == [0, 0, 0]
    again = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_dir() and p.name.startswith("c")}
    assert {k: again[k] for k in done} == done and len(again) == 5  # committed classes were not redone
    assert _files(folder) == _files(reference / "dit") and _manifest(folder) == _manifest(reference / "dit")


def _bench_worker(rank: int, size: int, root: str, store: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=60))
        atexit.register(dist.destroy_process_group)  # left before exit: gloo can abort in teardown
    import gendd.evaluate as ev
    from gendd.bench import run_bench
    from test_bench import tiny_config

    real = ev.evaluate_distilled

    def logged(train, test, protocol, seeds=None, progress=True):
        with open(Path(root) / f"cells-{rank}.log", "a") as f:
            f.write(f"{train.name} {list(seeds)}\n")
        return real(train, test, protocol, seeds=seeds, progress=progress)

    ev.evaluate_distilled = logged
    world = (Path(root) / "data", Path(root) / "bb")
    run_bench(tiny_config(world, Path(root), metrics=False), Path(root) / "bench", progress=False)


def test_bench_cells_split_across_ranks_are_each_computed_once(tmp_path):
    import uuid

    from test_bench import make_bench_world

    make_bench_world(tmp_path)
    ctx = mp.get_context("spawn")
    store = str(tmp_path / f"pg-{uuid.uuid4().hex}")
    procs = [ctx.Process(target=_bench_worker, args=(r, 2, str(tmp_path), store)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    cells = [line for r in range(2) for line in (tmp_path / f"cells-{r}.log").read_text().splitlines()]
    per_rank = [len((tmp_path / f"cells-{r}.log").read_text().splitlines()) for r in range(2)]
    assert len(cells) == len(set(cells)) == 8 and per_rank == [4, 4]  # 2 methods x 2 IPCs x 2 students
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["n"] == 2 for r in rows)


def _finetune_worker(rank: int, size: int, root: str, store: str, eviction: str) -> None:
    import datetime

    import torch

    torch.set_num_threads(1)
    if size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=60))

        atexit.register(dist.destroy_process_group)  # left before exit: gloo can abort in teardown
    from gendd.backbone import tiny_backbone
    from gendd.backbone.finetune import FinetuneConfig, finetune

    bb = tiny_backbone(num_classes=3, image_size=16, channels=1, pad=2, vae_channels=(32, 32))
    g = torch.Generator().manual_seed(0)
    latents = {c: torch.randn((6, *bb.latent_shape), generator=g) for c in range(3)}
    cfg = FinetuneConfig(steps=4, batch_size=4, memory_size=3, eviction=eviction, ema_decay=0.5,
                         checkpoint_every=2)
    losses = []
    finetune(bb, latents, Path(root) / "ft", cfg, progress=False, on_step=losses.append)
    if rank == 0:
        (Path(root) / "losses.json").write_text(json.dumps(losses))


def _finetune(size: int, root: Path, eviction: str) -> list[int]:
    import uuid

    ctx = mp.get_context("spawn")
    store = str(root / f"pg-{uuid.uuid4().hex}")
    procs = [ctx.Process(target=_finetune_worker, args=(r, size, str(root), store, eviction)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


@pytest.mark.parametrize("eviction", ["fifo", "max-similarity"])
def test_ddp_finetuning_equals_one_process_on_the_same_global_batch(tmp_path, eviction):
    import torch
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert _finetune(1, one, eviction) == [0]
    assert _finetune(2, two, eviction) == [0, 0]
    w1 = load_file(str(next((one / "ft" / "transformer").glob("*.safetensors"))))
    w2 = load_file(str(next((two / "ft" / "transformer").glob("*.safetensors"))))
    assert w1.keys() == w2.keys()
    diff = {k: float((w1[k] - w2[k]).abs().max()) for k in w1}
    # Two ranks run the forward on halves of each batch and sum the gradients across ranks: float32 rounding of
    # each gradient (relative ~1e-6). AdamW's step is lr * m / (sqrt(v) + eps), so that moves a weight by a
    # rounding-level fraction of lr = 1e-3 per step (4 steps): below 1e-6. The exception is a gradient that is 0 in
    # exact arithmetic, whose rounding noise AdamW normalises to a full step of either sign (up to 2 lr per step):
    # the attention key biases (a bias added to every key shifts each query's logits by one constant, which the
    # softmax ignores).
    key_bias = {k for k in w1 if k.endswith("attn1.to_k.bias")}
    assert max(v for k, v in diff.items() if k not in key_bias) < 1e-6, diff
    assert max(diff[k] for k in key_bias) <= 2 * 1e-3 * 4
    l1 = json.loads((one / "losses.json").read_text())
    l2 = json.loads((two / "losses.json").read_text())
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2, 3, 4]
    for a, b in zip(l1, l2):  # the logged losses are global means on both
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["diffusion"] == pytest.approx(b["diffusion"], rel=1e-5)
    c1 = torch.load(one / "ft" / "checkpoints" / "chunk_000.pt", weights_only=False)
    c2 = torch.load(two / "ft" / "checkpoints" / "chunk_000.pt", weights_only=False)
    for kind in ("real", "gen"):  # the memories hold the same global batches, in the same order
        for c in range(3):
            m1, m2 = c1["extra"][kind][c], c2["extra"][kind][c]
            if isinstance(m1, dict):
                m1, m2 = m1.get("items"), m2.get("items")
            assert (m1 is None) == (m2 is None)
            if m1 is not None and kind == "real":
                assert torch.equal(m2, m1)  # real latents, copied
            elif m1 is not None:  # x0_hat: a DiT forward's rounding (on other batch shapes)
                assert_close_f32(m2, m1, n=TINY_DIT_N)
    assert not (two / "ft" / "checkpoints" / "chunk_000.pt.tmp").exists()


def _preview_worker(rank: int, size: int, root: str, store: str) -> None:
    import datetime

    import torch

    torch.set_num_threads(1)
    if size > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=60))

        atexit.register(dist.destroy_process_group)  # left before exit: gloo can abort in teardown
    from gendd.backbone import tiny_backbone
    from gendd.methods import build_method
    from gendd.pipeline import sample_preview

    bb = tiny_backbone(num_classes=5, image_size=16, channels=1, pad=2, vae_channels=(32, 32))
    images = sample_preview(bb, 5, 2, build_method("dit", num_steps=2, seed=3).config.sampler_config(bb), seed=3)
    if rank == 0:
        torch.save(images, Path(root) / f"preview-{size}.pt")


@pytest.mark.parametrize("size", [2, 3])
def test_backbone_sample_is_class_sharded_and_equals_one_process(tmp_path, size):
    """`gendd backbone sample` under torchrun: labels split across ranks, gathered on rank 0, byte for byte
    one process's grid; each label's images are the ones `gendd distill dit` makes for that class."""
    import uuid

    import numpy as np
    import torch
    from PIL import Image

    from conftest import make_dataset
    from gendd.backbone import tiny_backbone
    from gendd.export import distill
    from gendd.methods import build_method

    ctx = mp.get_context("spawn")
    for n in (1, size):
        store = str(tmp_path / f"pg-{uuid.uuid4().hex}")
        procs = [ctx.Process(target=_preview_worker, args=(r, n, str(tmp_path), store)) for r in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        assert [p.exitcode for p in procs] == [0] * n
    one, many = torch.load(tmp_path / "preview-1.pt"), torch.load(tmp_path / f"preview-{size}.pt")
    assert one.shape == (10, 1, 12, 12) and torch.equal(one, many)
    from gendd.evaluate.fit import threads

    bb = tiny_backbone(num_classes=5, image_size=16, channels=1, pad=2, vae_channels=(32, 32))
    with threads(1):  # the workers' thread count: the same float sums
        distill(build_method("dit", num_steps=2, seed=3), make_dataset(num_classes=5, size=12), 2,
                tmp_path / "dit", backbone=bb, progress=False)
    for c in range(5):
        for i in range(2):
            png = np.array(Image.open(tmp_path / "dit" / f"c{c}" / f"{i}.png"))
            assert np.array_equal(png, one[2 * c + i, 0].numpy())


def test_torchrun_cli_writes_one_process_output_and_reports_once(tmp_path):
    """``torchrun -m gendd distill`` as a user types it: two ranks write the one-process folder byte for byte and
    the closing line is printed once (by rank 0)."""
    import subprocess
    import sys

    from PIL import Image

    root = tmp_path / "ds"
    for split in ("train", "val"):
        for k, c in enumerate(("a", "b", "c")):
            (root / split / c).mkdir(parents=True)
            for i in range(4):  # every image distinct, so a class written in another's place would show
                Image.new("L", (8, 8), 40 * i + 10 * k).save(root / split / c / f"{i}.png")
    args = ["-m", "gendd", "distill", "random", "--data", "imagefolder", "--data-root", str(root), "--ipc", "2",
            "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    closing = [ln for ln in two.stdout.splitlines() if ln.startswith("random: 3 classes")]
    assert len(closing) == 1 and closing[0].endswith(str(tmp_path / "two"))
