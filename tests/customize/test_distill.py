"""Distillation: the KL loss against hand-written references, the teacher-logit cache, and a tiny run."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from corral.checkpoints import load_checkpoint, load_model
from corral.cli.main import main as corral
from corral.customize import distill as distill_module
from corral.customize.data import IGNORE, Batches, collate
from corral.customize.distill import DistillTask, TeacherCache, distill, kd_loss_sum, teacher_top_k
from corral.customize.train import TrainConfig
from tests.customize.tiny_chat import write_tiny_chat_model
from tests.customize.tiny_chat import one_thread  # noqa: F401 (an autouse fixture: one torch thread)

TEXT = ("The river runs past the old mill and under the stone bridge. Children play on its banks in summer, "
        "and in winter the water freezes at the edges. ") * 12


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, k: int, t: float) -> float:
    """T^2 * sum over rows of KL(teacher's top-k renormalised at T || student at T), in float64 Python."""
    total = 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist()):
        top = sorted(range(len(t_row)), key=lambda i: -t_row[i])[:k]
        zt = sum(math.exp(t_row[i] / t) for i in top)
        zs = sum(math.exp(x / t) for x in s_row)
        for i in top:
            p = math.exp(t_row[i] / t) / zt
            q = math.exp(s_row[i] / t) / zs
            total += p * (math.log(p) - math.log(q))
    return total * t * t


@pytest.mark.parametrize("k, t", [(40, 1.0), (40, 2.0), (5, 1.0), (5, 0.5)])
def test_kd_loss_matches_reference(k, t):
    g = torch.Generator().manual_seed(k)
    student, teacher = 3 * torch.randn(6, 40, generator=g), 3 * torch.randn(6, 40, generator=g)
    top = teacher.topk(k, dim=-1)
    ours = kd_loss_sum(student, top.values, top.indices, t).item()
    assert ours == pytest.approx(reference_kl(student, teacher, k, t), rel=1e-5, abs=1e-6)
    if k == 40:  # the whole vocabulary: torch's own KL
        ref = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                       reduction="sum") * t * t
        assert ours == pytest.approx(ref.item(), rel=1e-5)
        assert kd_loss_sum(teacher, top.values, top.indices, t).item() == pytest.approx(0, abs=1e-5)


def test_mixed_loss_and_mask():
    """kd_weight mixes in cross-entropy; padded positions count for neither."""
    from corral.customize.data import Sample

    torch.manual_seed(0)
    vocab, k = 32, 4
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
    samples = [Sample([1, 2, 3, 4, 5], [False, True, True, True, True]), Sample([6, 7, 8], [False, True, True])]
    values = np.random.default_rng(0).normal(size=(2, 4, k)).astype(np.float32)
    indices = np.random.default_rng(1).integers(0, vocab, size=(2, 4, k)).astype(np.int32)
    cache = TeacherCache(None, values, indices, computed=False)
    loss, n = DistillTask(cache, temperature=2.0, kd_weight=0.25).loss(model, samples, [0, 1])
    assert n == 6
    inputs, labels = collate(samples)
    logits = model(inputs)
    kl = ce = 0.0
    for b, s in enumerate(samples):
        for pos in range(len(s) - 1):
            row, tv, ti = logits[b, pos:pos + 1], torch.from_numpy(values[b, pos:pos + 1]), \
                torch.from_numpy(indices[b, pos:pos + 1])
            kl += reference_kl_sparse(row, tv, ti, 2.0)
            ce += F.cross_entropy(row, labels[b, pos:pos + 1]).item()
    assert loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, rel=1e-5)
    assert (labels == IGNORE).sum() == 2


def reference_kl_sparse(student_row, values, indices, t):
    """KL for one position whose teacher top-k (values, indices) is given, by hand."""
    p = torch.softmax(values[0].double() / t, -1)
    log_q = torch.log_softmax(student_row[0].double() / t, -1)[indices[0].long()]
    return float((p * (p.log() - log_q)).sum().detach() * t * t)


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama3_tokenizer_model):
    root = tmp_path_factory.mktemp("distill")
    teacher = write_tiny_chat_model(root / "teacher", llama3_tokenizer_model, seed=2, tie=False)
    student = write_tiny_chat_model(root / "student", llama3_tokenizer_model, seed=1, tie=False)
    (root / "corpus.txt").write_text(TEXT)
    return {"teacher": teacher, "student": student, "data": root / "corpus.txt", "root": root}


def test_distill_caches_the_teacher_once(models, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    cfg = dict(steps=4, batch_size=4, lr=3e-3, progress=False)
    run = distill(models["teacher"], models["student"], models["data"], tmp_path / "s1", top_k=16, seq_len=32,
                  cache_dir=cache_dir, train_config=TrainConfig(**cfg), eval_fraction=0.2)
    assert run.cache.computed
    hist = [r["loss"] for r in run.result.history]
    assert hist[-1] < hist[0]  # KL to the teacher goes down

    # The cached top-k equals a fresh pass of the int8 teacher over the same samples.
    from corral.customize.finetune import prepare

    prep = prepare(models["student"], models["data"], seq_len=32, eval_data=None, eval_fraction=0.2, seed=0)
    used = Batches(prep.train, 4, seed=0).used(4)  # the teacher ran on the sequences the 4 steps visit only
    assert run.cache.rows == used and len(used) == 16 < len(prep.train)
    teacher, _ = load_model(models["teacher"], quantize="int8")
    values, indices = teacher_top_k(teacher, [prep.train[i] for i in used], 16)
    np.testing.assert_allclose(run.cache.values, values, rtol=0, atol=1e-5)
    assert (run.cache.indices == indices).mean() > 0.999  # ties at the k-th logit may order differently

    # A second run with the same teacher, data, k and length never runs the teacher.
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(distill_module, "teacher_top_k", no_teacher)
    again = distill(models["teacher"], models["student"], models["data"], tmp_path / "s2", top_k=16, seq_len=32,
                    cache_dir=cache_dir, train_config=TrainConfig(**cfg), eval_fraction=0.2)
    assert not again.cache.computed and again.cache.path == run.cache.path
    for a, b in zip(run.result.history, again.result.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # A different k is a different key.
    monkeypatch.undo()
    other = distill(models["teacher"], models["student"], models["data"], tmp_path / "s3", top_k=8, seq_len=32,
                    cache_dir=cache_dir, train_config=TrainConfig(**{**cfg, "steps": 1}), eval_fraction=0.2)
    assert other.cache.computed and other.cache.path != run.cache.path

    out, _ = load_model(tmp_path / "s1", dtype=torch.float32)  # the student, a HF checkpoint with its recipe
    from corral.checkpoints.save import read_recipe

    recipe = read_recipe(load_checkpoint(tmp_path / "s1"))
    assert recipe["command"] == "distill" and recipe["top_k"] == 16 and recipe["teacher_dtype"] == "int8"


def test_cli(models, tmp_path, capsys):
    argv = ["distill", "--teacher", str(models["teacher"]), "--student", str(models["student"]),
            str(models["data"]), str(tmp_path / "out"), "--steps", "1", "--seq-len", "32", "--top-k", "4",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--kd-weight", "0.5", "--temperature", "2"]
    assert corral(argv) == 0
    assert "teacher logits computed" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    # A student whose tokenizer numbers two tokens the other way round: same vocabulary size, other ids.
    other = tmp_path / "other-tokenizer"
    shutil.copytree(models["student"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    cases = [
        (["--student", str(other)], "tokenize text differently"),
        (["--teacher", str(tmp_path / "nope")], "nope"),
        (["--student", str(tmp_path / "nope")], "nope"),
        ([str(bad)], "bad.jsonl:2: expected"),
        (["--top-k", "0"], "top-k must be >= 1"),
        (["--kd-weight", "2"], "kd_weight must be in [0, 1]"),
    ]
    for n, (change, message) in enumerate(cases):
        args = _apply(argv, change)
        args[6] = str(tmp_path / f"out{n}")  # a fresh OUT each time
        assert corral(args) == 1, change
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("corral: error: ") and message in err[0], (change, err)


def _apply(argv, change):
    """argv with an option's value replaced (["--teacher", X]) or the DATA positional replaced ([X])."""
    argv = list(argv)
    if len(change) == 1:
        argv[5] = change[0]
    else:
        argv[argv.index(change[0]) + 1] = change[1]
    return argv
