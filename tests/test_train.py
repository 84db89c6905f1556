"""Tests of ``mla.train``: byte dataset, schedule, learning on real text, bit-exact resume, checkpoints
and the ``python -m mla.train`` CLI. CPU only, small models (the whole file runs in well under a minute
on 2 cores)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import usage_error

from mla.train import (
    DEFAULT_DATA,
    METRIC_KEYS,
    ByteDataset,
    TrainConfig,
    Trainer,
    bits_per_byte,
    evaluate,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    save_checkpoint,
)
from mla.train.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

# A small MLA model (about 60k parameters) that learns quickly on CPU.
SMALL = dict(
    num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
)
SMALL_FLAGS = ["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "2", "--kv-lora-rank", "32"]


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        overrides=dict(SMALL), steps=8, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2,
        eval_interval=4, eval_batches=2, progress=False, verbose=False,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def corpus() -> ByteDataset:
    return ByteDataset(None)


# ------------------------------------------------------------------------------------------- data


def test_bits_per_byte_is_loss_over_ln2():
    assert bits_per_byte(math.log(256)) == pytest.approx(8.0, abs=1e-12)
    for loss in (0.0, 1.0, 2.345, 5.5):
        assert bits_per_byte(loss) == pytest.approx(loss / math.log(2), rel=1e-15)


def test_default_corpus_split(corpus):
    n = len(corpus)
    assert corpus.name == DEFAULT_DATA
    assert n > 100_000  # CPython's pydoc topics: ~0.45 MB of English documentation
    assert corpus.val.numel() == round(0.1 * n)
    assert corpus.train.numel() + corpus.val.numel() == n
    assert corpus.train.dtype == torch.uint8 and corpus.val.dtype == torch.uint8
    text = bytes(corpus.train[:20_000].tolist()).decode("utf-8", errors="replace")
    assert "statement" in text  # real English text
    # the validation split is the tail of the corpus
    from mla.train import load_bytes

    raw = load_bytes(None)
    assert bytes(corpus.val.tolist()) == raw[-corpus.val.numel():]
    assert bytes(corpus.train[-50:].tolist()) == raw[corpus.train.numel() - 50: corpus.train.numel()]


def test_windows_shapes_targets_and_determinism(corpus):
    g = torch.Generator().manual_seed(3)
    x, y = corpus.get_batch("train", 5, 48, g)
    assert x.shape == y.shape == (5, 48)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    # every window is a contiguous piece of the split
    train_bytes = bytes(corpus.train.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert bytes(row_x + row_y[-1:]) in train_bytes
    x2, y2 = corpus.get_batch("train", 5, 48, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_val_windows_disjoint_from_train():
    # 900 'a' bytes of training data, then 100 'b' bytes of validation data: any window that crossed the
    # boundary would mix them.
    ds = ByteDataset(b"a" * 900 + b"b" * 100, val_fraction=0.1)
    assert ds.train.numel() == 900 and ds.val.numel() == 100
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = ds.get_batch("train", 16, 99, g)
        assert bool((x == ord("a")).all()) and bool((y == ord("a")).all())
        x, y = ds.get_batch("val", 16, 99, g)  # the longest window the val split holds
        assert bool((x == ord("b")).all()) and bool((y == ord("b")).all())
    with pytest.raises(ValueError, match="seq_len"):
        ds.get_batch("val", 1, 100, g)


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ByteDataset(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        ByteDataset(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        ByteDataset(b"abcdef" * 10, val_fraction=0.0)
    ds = ByteDataset(b"abcdef" * 10)
    with pytest.raises(ValueError, match="split"):
        ds.get_batch("test", 1, 2)
    with pytest.raises(ValueError, match="batch_size"):
        ds.get_batch("train", 0, 2)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup=10)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing
    assert lrs[55] == pytest.approx(0.5 * (1e-3 + 1e-4))  # cosine midpoint
    assert lrs[100] == pytest.approx(1e-4) and lrs[119] == pytest.approx(1e-4)


def test_config_errors():
    for bad in (dict(steps=0), dict(batch_size=0), dict(lr=0.0), dict(min_lr=1.0), dict(attention="x"),
                dict(dtype="float16"), dict(resume="latest")):
        with pytest.raises(ValueError):
            TrainConfig(**bad).validate()
    with pytest.raises(KeyError, match="tiny"):
        TrainConfig(preset="no-such-preset").validate()


# --------------------------------------------------------------------------------------- training


def test_thirty_steps_lower_the_loss(corpus):
    cfg = small_cfg(steps=30, batch_size=8, seq_len=32, lr=1e-2, min_lr=1e-3, warmup=3, eval_interval=30,
                    eval_batches=4)
    trainer = Trainer(cfg, dataset=corpus)
    metrics = trainer.fit()
    assert [m["step"] for m in metrics] == [0, 30]
    start, end = metrics
    assert start["val_bpb"] == pytest.approx(8.0, abs=0.1)  # uniform guess over 256 bytes at init
    assert end["val_bpb"] < start["val_bpb"] - 2.0, metrics
    losses = [loss for _, loss in trainer.step_losses]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    for rec in metrics:
        assert set(METRIC_KEYS) <= set(rec)
        assert rec["val_bpb"] == pytest.approx(rec["val_loss"] / math.log(2))
    assert end["tokens"] == 30 * 8 * 32 and end["tokens_per_s"] > 0 and end["elapsed_s"] > 0


def test_progress_bar_stays_out_of_non_terminal_stderr(corpus, capsys):
    Trainer(small_cfg(steps=2, eval_interval=2, eval_batches=1, progress=True), dataset=corpus).fit()
    err = capsys.readouterr().err  # captured: not a terminal
    assert "step/s" not in err and "s/step" not in err and "\r" not in err


def test_resume_continues_identically(tmp_path, corpus):
    # uninterrupted run of 8 steps, checkpoints at 4 and 8
    full = Trainer(small_cfg(out_dir=str(tmp_path / "a"), save_interval=4, keep_checkpoints=0), dataset=corpus)
    full_metrics = full.fit()
    ckpt = tmp_path / "a" / "step_0000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.safetensors").is_file()
    assert latest_checkpoint(tmp_path / "a").name == "step_0000008"
    # resume from the half-way checkpoint and finish
    resumed = Trainer(small_cfg(out_dir=str(tmp_path / "b"), resume=str(ckpt)), dataset=corpus)
    assert resumed.step == 4
    resumed_metrics = resumed.fit()
    assert resumed.step_losses == [(s, loss) for s, loss in full.step_losses if s >= 4]  # bitwise equal
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for pa, pb in zip(full.model.parameters(), resumed.model.parameters()):
        sa, sb = full.optimizer.state[pa], resumed.optimizer.state[pb]
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())
    strip = ("elapsed_s", "tokens_per_s")
    assert [{k: v for k, v in m.items() if k not in strip} for m in full_metrics] == [
        {k: v for k, v in m.items() if k not in strip} for m in resumed_metrics
    ]


def test_request_stop_saves_and_resumes_identically(tmp_path, corpus, monkeypatch):
    """What Ctrl-C does (``request_stop`` from the CLI's SIGINT handler): stop after the current step, no
    extra evaluation, a checkpoint a resume continues from as if never interrupted."""
    full = Trainer(small_cfg(out_dir=str(tmp_path / "a")), dataset=corpus)
    full_metrics = full.fit()
    stopped = Trainer(small_cfg(out_dir=str(tmp_path / "b")), dataset=corpus)
    step = stopped.train_step

    def step_then_interrupt():
        loss = step()
        if stopped.step == 3:
            stopped.request_stop()
        return loss

    monkeypatch.setattr(stopped, "train_step", step_then_interrupt)
    metrics = stopped.fit()
    assert stopped.stopped and stopped.step == 3
    assert [m["step"] for m in metrics] == [0]  # no evaluation at the interruption
    assert stopped.last_checkpoint.name == "step_0000003"
    resumed = Trainer(small_cfg(out_dir=str(tmp_path / "b"), resume="latest"), dataset=corpus)
    assert resumed.step == 3
    resumed_metrics = resumed.fit()
    assert not resumed.stopped
    assert resumed.step_losses == [(s, loss) for s, loss in full.step_losses if s >= 3]  # bitwise equal
    strip = ("elapsed_s", "tokens_per_s")
    assert [{k: v for k, v in m.items() if k not in strip} for m in full_metrics] == [
        {k: v for k, v in m.items() if k not in strip} for m in resumed_metrics
    ]


@pytest.mark.slow
def test_cli_ctrl_c_saves_and_prints_resume_command(tmp_path):
    """SIGINT to a running ``python -m mla.train``: exit 130, a checkpoint, the resume command, no traceback."""
    import signal
    import time

    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "mla.train", *SMALL_FLAGS, "--batch-size", "2", "--seq-len", "16",
           "--steps", "100000", "--eval-interval", "100000", "--eval-batches", "1", "--no-eval-at-start",
           "--out", str(out), "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # the info line, printed just before training starts
        assert first.startswith("model:") and "1 torch thread" in first, first
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and int(ckpt.name[5:]) > 0
    assert f"checkpoint {ckpt}" in stderr
    resume = next(line for line in stderr.splitlines() if line.startswith("resume with: "))
    assert resume.endswith(" --resume") and "--out" in resume and "--resume --resume" not in resume


def test_cli_default_threads_in_first_line(tmp_path, capsys):
    from mla.threads import auto_threads

    threads = torch.get_num_threads()
    try:
        assert cli_main([*SMALL_FLAGS, "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--eval-batches", "1",
                         "--no-progress"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert "torch thread" in first and "auto:" in first
        assert 1 <= torch.get_num_threads() <= max(1, threads) and auto_threads(processes=10**6) == 1
    finally:
        torch.set_num_threads(threads)


def test_checkpoint_roundtrip_tied_weights(tmp_path):
    from mla import registry

    torch.manual_seed(0)
    model = registry.build("tiny", **SMALL, tie_word_embeddings=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 8))
    model(x, targets=x).loss.backward()
    opt.step()
    path = save_checkpoint(tmp_path / "ck", model, opt, {"note": "hi", "step": 1})
    torch.manual_seed(1)
    model2 = registry.build("tiny", **SMALL, tie_word_embeddings=True)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    meta = load_checkpoint(path, model2, opt2)
    assert meta["note"] == "hi" and meta["step"] == 1
    assert model2.lm_head.weight is model2.embed_tokens.weight
    for p, q in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(p, q)
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", model2)
    other = registry.build("tiny", **{**SMALL, "hidden_size": 32})
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(path, other)


def test_evaluate_is_fixed_and_leaves_rng_alone(corpus):
    from mla import registry

    torch.manual_seed(0)
    model = registry.build("tiny", **SMALL)
    rng = torch.get_rng_state()
    a = evaluate(model, corpus, batch_size=2, seq_len=16, num_batches=2, seed=5)
    b = evaluate(model, corpus, batch_size=2, seq_len=16, num_batches=2, seed=5)
    assert a == b and math.isfinite(a)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training


@pytest.mark.parametrize("mode", ["block", "topk"])
def test_sparse_attention_trains(corpus, mode):
    cfg = small_cfg(attention="sparse", sparse_mode=mode, steps=2, eval_interval=2, eval_batches=1,
                    overrides={**SMALL, "sparse_block_size": 8, "index_topk": 16, "index_head_dim": 16})
    metrics = Trainer(cfg, dataset=corpus).fit()
    assert metrics[-1]["step"] == 2 and math.isfinite(metrics[-1]["val_loss"])


def test_max_time_stops_early(corpus):
    cfg = small_cfg(steps=10_000, max_time=0.5, eval_interval=10_000, eval_at_start=False)
    trainer = Trainer(cfg, dataset=corpus)
    metrics = trainer.fit()
    assert 0 < trainer.step < 10_000
    assert metrics[-1]["step"] == trainer.step  # a final evaluation where it stopped


# -------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_writes_json_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    cmd = [
        sys.executable, "-m", "mla.train", *SMALL_FLAGS, "--steps", "4", "--batch-size", "2", "--seq-len", "16",
        "--eval-interval", "2", "--eval-batches", "1", "--metrics-out", str(metrics), "--out",
        str(tmp_path / "ck"), "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [0, 2, 4]
    for rec in lines:
        assert {"step", "train_loss", "val_loss", "tokens_per_s", "val_bpb", "lr", "elapsed_s"} <= set(rec)
        assert math.isfinite(rec["val_loss"]) and rec["val_bpb"] == pytest.approx(rec["val_loss"] / math.log(2))
    assert lines[-1]["tokens_per_s"] > 0
    assert "bits/byte" in proc.stdout
    assert latest_checkpoint(tmp_path / "ck").name == "step_0000004"


def test_cli_resume_in_process(tmp_path, capsys):
    common = [*SMALL_FLAGS, "--batch-size", "2", "--seq-len", "16", "--eval-interval", "2",
              "--eval-batches", "1", "--out", str(tmp_path / "ck"), "--no-progress", "--quiet"]
    assert cli_main([*common, "--steps", "3"]) == 0
    assert cli_main([*common, "--steps", "3", "--resume", "--metrics-out", str(tmp_path / "m.jsonl")]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 3]  # history restored from the checkpoint, nothing left to train


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps"),
        (["--data", "/no/such/file.txt"], "--data"),
        (["--preset", "nope"], "--preset"),
        (["--seq-len", "10000000"], "--seq-len"),
        (["--layers", "0"], "--layers"),
        (["--resume"], "--resume: 'latest' (--resume without a path: the newest checkpoint in --out) needs out_dir; "
                       "pass --out DIR"),
        (["--sparse-mode", "topk"], "--sparse-mode"),
        (["--steps", "10", "--warmup", "10"], "--warmup"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--lr", "-1"], "--"),
    ],
)
def test_cli_bad_input(argv, message, capsys):
    err = usage_error(cli_main, [*argv, "--no-progress"], capsys)
    assert "error:" in err and message in err


def test_resume_command_replaces_resume_and_its_value():
    from mla.train.__main__ import _resume_command

    assert _resume_command(["--out", "runs/a b", "--resume", "runs/a b/step_0000004", "--steps", "9"]) == (
        "python -m mla.train --out 'runs/a b' --steps 9 --resume")
    assert _resume_command(["--resume", "--out", "o"]) == "python -m mla.train --out o --resume"
    assert _resume_command(["--resume=o/step_1", "--out", "o"]) == "python -m mla.train --out o --resume"


def test_cli_first_line_names_threads_also_when_resuming(tmp_path, capsys):
    common = [*SMALL_FLAGS, "--batch-size", "2", "--seq-len", "16", "--eval-interval", "2", "--eval-batches", "1",
              "--out", str(tmp_path / "ck"), "--no-progress", "--threads", "1"]
    assert cli_main([*common, "--steps", "2"]) == 0
    capsys.readouterr()
    assert cli_main([*common, "--steps", "2", "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model:") and "1 torch thread (--threads)" in lines[0], lines
    assert lines[1].startswith("resumed from "), lines
