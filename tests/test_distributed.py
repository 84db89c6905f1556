"""Distributed training and tensor parallelism on CPU (gloo, 2 processes launched with torchrun).

* DDP and FSDP2 (``python -m mla.train --distributed ddp|fsdp``) on 2 ranks with ``--batch-size 4`` follow
  the same loss curve as one process with ``--batch-size 8`` (the same global batches, losses averaged the
  same way, the same initial weights): they differ only by float summation order.
* A checkpoint written on 2 ranks resumes on 1 and one written on 1 resumes on 2, continuing that curve.
* ``mla.parallel``: MLA sharded by heads on 2 ranks gives the single-process outputs and gradients (naive
  and absorbed forms, with and without ``q_lora_rank``, cached decoding, a whole model with its MLPs and
  greedy generation). That check runs this file as a torchrun script (``_tp_worker``).

Each launch takes 15-25 s on a loaded 2-core machine (mostly interpreter start-up and imports).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)]

SMALL = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2, kv_lora_rank=32)
MODEL_FLAGS = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-lora-rank", "32"]
STEPS, GLOBAL_BATCH, SEQ = 10, 8, 32
RUN_FLAGS = [
    *MODEL_FLAGS, "--seq-len", str(SEQ), "--steps", str(STEPS), "--warmup", "2", "--eval-interval", "1",
    "--eval-batches", "1", "--no-progress", "--threads", "1", "--device", "cpu",
]
REL = 1e-4  # fp32: measured differences are ~2e-7 (summation order only)
TIMEOUT = 110  # seconds per launch


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` (a free rendezvous port is chosen by torch)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    log = f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, log
    return proc


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_curve(got: list[dict], ref: list[dict], first_step: int = 0) -> None:
    ref = [r for r in ref if r["step"] >= first_step]
    got = [r for r in got if r["step"] >= first_step]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(first_step, STEPS + 1))
    for a, b in zip(got, ref):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=REL), (key, a["step"], a[key], b[key])
        assert a["tokens"] == b["tokens"] and a["lr"] == pytest.approx(b["lr"], rel=1e-12)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process reference: global batch 8, 10 steps, a checkpoint at step 5 (in this process)."""
    from mla.train import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    cfg = TrainConfig(
        overrides=dict(SMALL), steps=STEPS, batch_size=GLOBAL_BATCH, seq_len=SEQ, warmup=2, eval_interval=1,
        eval_batches=1, out_dir=str(out / "ck"), save_interval=5, keep_checkpoints=0,
        metrics_out=str(out / "metrics.jsonl"), threads=1, progress=False, verbose=False, distributed="none",
    )
    try:
        trainer = Trainer(cfg)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return trainer, out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun([
        "-m", "mla.train", *RUN_FLAGS, "--distributed", "fsdp", "--batch-size", str(GLOBAL_BATCH // 2),
        "--out", str(out / "ck"), "--save-interval", "5", "--keep", "0", "--metrics-out", str(out / "m.jsonl"),
    ])
    return proc, out


# ------------------------------------------------------------------------------------ data sharding


def test_rank_shards_tile_the_global_batch():
    from mla.train import ByteDataset

    data = ByteDataset(bytes(range(256)) * 40)
    g1 = torch.Generator().manual_seed(3)
    x, y = data.get_batch("train", 6, 16, g1)
    shards = []
    for rank in range(3):
        g = torch.Generator().manual_seed(3)
        shards.append(data.get_batch("train", 2, 16, g, rank=rank, world_size=3))
        assert torch.equal(g.get_state(), g1.get_state())  # every rank's generator stays in step
    assert torch.equal(torch.cat([s[0] for s in shards]), x) and torch.equal(torch.cat([s[1] for s in shards]), y)
    with pytest.raises(ValueError, match="rank"):
        data.get_batch("train", 2, 16, rank=3, world_size=3)


def test_mode_resolution(monkeypatch):
    from mla.train.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("auto").mode == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="independent copies"):
        init_distributed("none")
    with pytest.raises(ValueError, match="distributed"):
        init_distributed("zero3")


# ------------------------------------------------------------------------------ data-parallel training


def test_ddp_two_ranks_match_one_process(single, tmp_path):
    ref_trainer, ref_out = single
    proc = torchrun([
        "-m", "mla.train", *RUN_FLAGS, "--distributed", "ddp", "--batch-size", str(GLOBAL_BATCH // 2),
        "--metrics-out", str(tmp_path / "m.jsonl"),
    ])
    assert_same_curve(read_metrics(tmp_path / "m.jsonl"), ref_trainer.metrics)
    # rank 0 alone logs
    assert proc.stdout.count("ddp on 2 processes (global batch 8)") == 1
    assert proc.stdout.count("done: step 10") == 1 and proc.stdout.count("step     10/10") == 1


def test_fsdp_two_ranks_match_one_process(single, fsdp_run):
    ref_trainer, ref_out = single
    proc, out = fsdp_run
    assert_same_curve(read_metrics(out / "m.jsonl"), ref_trainer.metrics)
    assert proc.stdout.count("fsdp on 2 processes (global batch 8)") == 1
    # the checkpoint holds full tensors, exactly the names and shapes a 1-process run writes
    from safetensors.torch import load_file

    for name in ("model.safetensors", "optimizer.safetensors"):
        a = load_file(str(out / "ck" / "step_0000005" / name))
        b = load_file(str(ref_out / "ck" / "step_0000005" / name))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    meta = json.loads((out / "ck" / "step_0000005" / "state.json").read_text())
    assert meta["distributed"] == {"mode": "fsdp", "world_size": 2, "global_batch_size": GLOBAL_BATCH}


def test_checkpoint_from_two_ranks_resumes_on_one(single, fsdp_run, tmp_path):
    from mla.train import TrainConfig, Trainer

    ref_trainer, _ = single
    _, out = fsdp_run
    threads = torch.get_num_threads()
    cfg = TrainConfig(
        overrides=dict(SMALL), steps=STEPS, batch_size=GLOBAL_BATCH, seq_len=SEQ, warmup=2, eval_interval=1,
        eval_batches=1, resume=str(out / "ck" / "step_0000005"), threads=1, progress=False, verbose=False,
        distributed="none",
    )
    try:
        with _no_resume_warning():
            trainer = Trainer(cfg)
        assert trainer.step == 5
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert_same_curve(trainer.metrics, ref_trainer.metrics, first_step=5)
    for (name, p), q in zip(ref_trainer.model.named_parameters(), trainer.model.parameters()):
        assert float((p - q).detach().norm() / p.detach().norm()) < REL, name


def test_checkpoint_from_one_rank_resumes_on_two(single, tmp_path):
    ref_trainer, ref_out = single
    proc = torchrun([
        "-m", "mla.train", *RUN_FLAGS, "--distributed", "fsdp", "--batch-size", str(GLOBAL_BATCH // 2),
        "--resume", str(ref_out / "ck" / "step_0000005"), "--metrics-out", str(tmp_path / "m.jsonl"),
    ])
    assert "resumed from" in proc.stdout and "differ from the checkpoint" not in proc.stderr
    assert_same_curve(read_metrics(tmp_path / "m.jsonl"), ref_trainer.metrics, first_step=5)


def test_fsdp_in_one_process_without_launcher(single, monkeypatch):
    """``--distributed fsdp`` without torchrun: a group of one process (created and destroyed here)."""
    from mla.train import TrainConfig, Trainer

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ref_trainer, _ = single
    threads = torch.get_num_threads()
    cfg = TrainConfig(
        overrides=dict(SMALL), steps=3, batch_size=GLOBAL_BATCH, seq_len=SEQ, warmup=2, eval_interval=10,
        eval_at_start=False, threads=1, progress=False, verbose=False, distributed="fsdp",
    )
    try:
        trainer = Trainer(cfg)
        assert dist.is_initialized() and trainer.dist.world_size == 1
        trainer.fit()
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    assert not dist.is_initialized()
    for (s, loss), (s_ref, loss_ref) in zip(trainer.step_losses, ref_trainer.step_losses[:3]):
        assert s == s_ref and loss == pytest.approx(loss_ref, rel=REL)


class _no_resume_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("error", message="resume:")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# -------------------------------------------------------------------------------- tensor parallelism

TP_MODEL = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, intermediate_size=128)


def test_parallelize_mla_rejects_bad_input():
    from mla import registry
    from mla.attention import LatentSparseAttention
    from mla.parallel import parallelize_mla

    with pytest.raises(TypeError, match="MultiHeadLatentAttention"):
        parallelize_mla(torch.nn.Linear(2, 2), None)
    cfg = registry.get("tiny", **TP_MODEL)
    with pytest.raises(NotImplementedError, match="LatentSparseAttention"):
        parallelize_mla(LatentSparseAttention(cfg), None)


def test_head_parallel_mla_matches_one_process(tmp_path):
    out = tmp_path / "tp.json"
    torchrun([str(Path(__file__).resolve()), "--tp-worker", str(out)])
    errs = json.loads(out.read_text())
    assert len(errs) > 40  # outputs and gradients of every case were compared
    bad = {k: v for k, v in errs.items() if not (math.isfinite(v) and v < 1e-5)}
    assert not bad, bad


def _tp_worker(out: str) -> None:
    """Runs under torchrun (2 ranks): compares head-parallel MLA with the unsharded module on every rank;
    rank 0 writes ``{case: relative error}`` to ``out`` (errors and mismatches as 1.0)."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from mla import registry
    from mla.attention import MultiHeadLatentAttention
    from mla.block import MLACausalLM
    from mla.cache import LatentCache
    from mla.parallel import parallelize_mla, parallelize_mla_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    errs: dict[str, float] = {}

    def rel(got, ref) -> float:
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        return float((got.detach() - ref.detach()).norm() / ref.detach().norm())

    def grads(name: str, ref: torch.nn.Module, tp: torch.nn.Module) -> None:
        tp_params = dict(tp.named_parameters())
        for pname, p in ref.named_parameters():
            if p.grad is not None:
                errs[f"{name}/grad/{pname}"] = rel(tp_params[pname].grad, p.grad)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, TP_MODEL["hidden_size"], generator=gen)
    w_out = torch.randn(2, 12, TP_MODEL["hidden_size"], generator=gen)
    for q_lora in (None, 16):
        cfg = registry.get("tiny", **TP_MODEL, q_lora_rank=q_lora, attention_bias=True)
        torch.manual_seed(0)
        ref = MultiHeadLatentAttention(cfg)
        tp = parallelize_mla(copy.deepcopy(ref), mesh)
        for form in ("naive", "absorbed"):
            name = f"q_lora={q_lora}/{form}"
            ref.zero_grad()
            tp.zero_grad()
            x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
            o_ref, _ = ref(x_ref, form=form)
            o_tp, _ = tp(x_tp, form=form)
            errs[f"{name}/out"] = rel(o_tp, o_ref)
            (o_ref * w_out).sum().backward()
            (o_tp * w_out).sum().backward()
            errs[f"{name}/grad/input"] = rel(x_tp.grad, x_ref.grad)
            grads(name, ref, tp)
        with torch.no_grad():  # prefill + 2 decode steps through a LatentCache (auto form: absorbed)
            c_ref, c_tp = LatentCache(1), LatentCache(1)
            for i, chunk in enumerate((x[:, :8], x[:, 8:9], x[:, 9:10])):
                a, st = ref(chunk, cache=c_ref)
                b, _ = tp(chunk, cache=c_tp)
                errs[f"q_lora={q_lora}/cache{i}_{st.form}/out"] = rel(b, a)

    cfg = registry.get("tiny", **TP_MODEL, num_hidden_layers=2)
    torch.manual_seed(0)
    ref_lm = MLACausalLM(cfg)
    tp_lm = parallelize_mla_model(copy.deepcopy(ref_lm), mesh, mlp=True)
    ids = torch.randint(0, 256, (2, 16), generator=gen)
    o_ref, o_tp = ref_lm(ids[:, :-1], targets=ids[:, 1:]), tp_lm(ids[:, :-1], targets=ids[:, 1:])
    errs["lm/logits"] = rel(o_tp.logits, o_ref.logits)
    o_ref.loss.backward()
    o_tp.loss.backward()
    grads("lm", ref_lm, tp_lm)
    same = torch.equal(ref_lm.generate(ids[:, :6], 6, temperature=0), tp_lm.generate(ids[:, :6], 6, temperature=0))
    errs["lm/generate_mismatch"] = 0.0 if same else 1.0

    for bad in (dict(num_attention_heads=3), {}):
        try:  # 3 heads on 2 ranks; then a module that is already sharded
            parallelize_mla(MultiHeadLatentAttention(registry.get("tiny", **{**TP_MODEL, **bad})) if bad else
                            tp_lm.layers[0].self_attn, mesh)
            errs[f"error_not_raised/{bad}"] = 1.0
        except ValueError:
            errs[f"error_raised/{bad}"] = 0.0
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(errs, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tp-worker":
        _tp_worker(sys.argv[2])
    else:
        sys.exit("usage: torchrun --nproc_per_node 2 tests/test_distributed.py --tp-worker OUT.json")
