"""The training loop under torchrun: 2 CPU processes (gloo) equal one process with the same global batch.

The test runs this file under `python -m torch.distributed.run --nproc-per-node 2`; each rank fine-tunes
the tiny model with `corral.customize.finetune.finetune` (batch 2 per rank) and saves its final weights and
losses. One process with batch 4 sees the same samples per step (`data.Batches`), so the weights and the
loss must agree up to the order of floating-point sums. DDP replicates the model; FSDP shards it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.customize.tiny_chat import write_tiny_chat_model
from tests.customize.tiny_chat import one_thread  # noqa: F401 (an autouse fixture: one torch thread)

TEXT = ("A small brown bird sat on the fence and sang to the morning. The farmer walked by with his dog, "
        "and the dog barked twice. ") * 10
STEPS = 3


def run_finetune(base, data, out, *, batch_size, fsdp=False):
    from corral.customize.finetune import finetune
    from corral.customize.train import TrainConfig, full_state_dict

    cfg = TrainConfig(steps=STEPS, batch_size=batch_size, lr=1e-3, progress=False, fsdp=fsdp, seed=3)
    run = finetune(base, data, out, method="full", train_config=cfg, seq_len=24, eval_fraction=0.0)
    return run, full_state_dict(run.model)


def worker(base, data, out, fsdp):
    """One rank: train, then save this rank's weights and the losses."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    run, _ = run_finetune(base, data, Path(out) / "model", batch_size=2, fsdp=fsdp)
    # This rank's own tensors: DDP's replica, or FSDP's shards gathered on every rank.
    local = {k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in run.model.state_dict().items()}
    torch.save(local, Path(out) / f"rank{rank}.pt")
    if rank == 0:
        (Path(out) / "losses.json").write_text(json.dumps([r["loss"] for r in run.result.history]))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama3_tokenizer_model):
    root = tmp_path_factory.mktemp("ddp")
    base = write_tiny_chat_model(root / "base", llama3_tokenizer_model, seed=4, tie=True)
    (root / "corpus.txt").write_text(TEXT)
    run, state = run_finetune(base, root / "corpus.txt", root / "single", batch_size=4)
    return {"base": base, "data": root / "corpus.txt", "root": root, "state": state,
            "losses": [r["loss"] for r in run.result.history]}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(setup, mode):
    out = setup["root"] / mode
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(setup["base"]), str(setup["data"]), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    single = setup["state"]
    assert set(ranks[0]) == set(single)
    for name, ref in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # replicas agree exactly
        torch.testing.assert_close(ranks[0][name], ref, rtol=1e-4, atol=1e-5)  # and equal one process
    losses = json.loads((out / "losses.json").read_text())
    assert losses == pytest.approx(setup["losses"], abs=1e-4)
    assert (out / "model" / "model.safetensors").is_file()  # rank 0 wrote the checkpoint


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], fsdp=sys.argv[4] == "fsdp")
