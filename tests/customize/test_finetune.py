"""Fine-tuning on a tiny chat model: the loss goes down, full checkpoints load everywhere, resume is exact,
and the commands fail with one clear line."""

import json

import pytest
import torch

from corral.checkpoints import load_checkpoint, load_model
from corral.cli.main import main as corral
from corral.customize.finetune import finetune, prepare
from corral.customize.lora import LoRAConfig, load_adapter
from corral.customize.train import TrainConfig, evaluate
from tests.customize.tiny_chat import write_chat_jsonl, write_tiny_chat_model
from tests.customize.tiny_chat import one_thread  # noqa: F401 (an autouse fixture: one torch thread)

FAST = dict(batch_size=4, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama3_tokenizer_model):
    return write_tiny_chat_model(tmp_path_factory.mktemp("ft") / "base", llama3_tokenizer_model)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "chats.jsonl")


def heldout_loss(model_dir, chats, adapter=None):
    """Mean assistant-token loss of the whole chat set under a model (optionally with an adapter merged)."""
    from corral.customize.lora import load_model_with_adapter

    loaded = load_model_with_adapter(model_dir, adapter, dtype=torch.float32) if adapter else \
        load_model(model_dir, dtype=torch.float32)
    prep = prepare(model_dir, chats, seq_len=128, eval_data=None, eval_fraction=0.0, seed=0, model_obj=loaded)
    return evaluate(prep.model, prep.train, batch_size=8)


def test_lora_lowers_the_loss(base, chats, tmp_path):
    before = heldout_loss(base, chats)
    run = finetune(base, chats, tmp_path / "lora", lora=LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj",
                                                                                             "gate_proj")),
                   train_config=TrainConfig(steps=6, **FAST), seq_len=128, eval_fraction=0.2)
    after = heldout_loss(base, chats, adapter=tmp_path / "lora")
    print(f"\n[finetune] lora: assistant-token loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5
    log = [json.loads(line) for line in (tmp_path / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and "eval_loss" in log[-1]
    assert run.result.eval_loss == pytest.approx(log[-1]["eval_loss"], abs=1e-5)
    assert load_adapter(tmp_path / "lora", load_checkpoint(base).config).config.rank == 4


def test_full_finetune_writes_a_checkpoint(base, chats, tmp_path):
    """Full fine-tuning with accumulation and activation checkpointing; the checkpoint loads in Corral and
    in transformers with the same logits, and carries its recipe."""
    from transformers import LlamaForCausalLM

    from corral.checkpoints.save import read_recipe

    before = heldout_loss(base, chats)
    out = tmp_path / "full"
    finetune(base, chats, out, method="full", seq_len=128, eval_fraction=0.0,
             train_config=TrainConfig(steps=4, grad_accum=2, activation_checkpointing=True,
                                      **{**FAST, "lr": 3e-3, "batch_size": 2}))
    after = heldout_loss(out, chats)
    assert after < before - 0.5
    ours, _ = load_model(out, dtype=torch.float32)
    toks = torch.randint(0, 576, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (ours(toks) - ref(toks).logits).abs().max().item() <= 1e-4
    recipe = read_recipe(load_checkpoint(out))
    assert recipe["command"] == "finetune" and recipe["method"] == "full" and recipe["train"]["grad_accum"] == 2


def test_resume_continues_exactly(base, chats, tmp_path):
    """Stopped after step 3 of 6 (checkpoint at step 2), resumed: the same adapter as an uninterrupted run."""
    cfg = dict(steps=6, save_every=2, **FAST)
    lora = LoRAConfig(rank=4, dropout=0.1)  # dropout: the resumed steps must draw the same masks
    finetune(base, chats, tmp_path / "whole", lora=lora, train_config=TrainConfig(**cfg), seq_len=128)

    def stop_at_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(base, chats, tmp_path / "cut", lora=lora, train_config=TrainConfig(**cfg), seq_len=128,
                 on_log=stop_at_3)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer.json").read_text())["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(base, chats, tmp_path / "cut", lora=lora, train_config=TrainConfig(**cfg), seq_len=128)
    resumed = finetune(base, chats, tmp_path / "cut", lora=lora, train_config=TrainConfig(**cfg), seq_len=128,
                       resume=True)
    assert [r["step"] for r in resumed.result.history] == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="cannot resume: method was 'lora', now 'full'"):
        finetune(base, chats, tmp_path / "cut", method="full", train_config=TrainConfig(**cfg), seq_len=128,
                 resume=True)
    config = load_checkpoint(base).config
    a, b = load_adapter(tmp_path / "whole", config).lora, load_adapter(tmp_path / "cut", config).lora
    for name in a:
        for x, y in zip(a[name], b[name]):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_cli_end_to_end(base, chats, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert corral(["finetune", str(base), str(chats), str(out), "--steps", "2", "--rank", "2", "--seq-len", "64",
                   "--no-progress", "--targets", "all"]) == 0
    assert "held-out loss" in capsys.readouterr().err
    assert corral(["generate", str(base), "hello", "--adapter", str(out), "--max-tokens", "2", "--temperature", "0",
                   "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["completion_tokens"] >= 1
    assert corral(["merge", str(base), str(out), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_errors(base, chats, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text().splitlines()[0] + "\n" + '{"messages": "nope"}\n')
    cases = [
        (["finetune", str(tmp_path / "no-model"), str(chats), str(tmp_path / "o1")], "no-model"),
        (["finetune", str(base), str(tmp_path / "no-data.jsonl"), str(tmp_path / "o2")], "no such file"),
        (["finetune", str(base), str(bad), str(tmp_path / "o3")], "bad.jsonl:2: messages must be a non-empty list"),
        (["finetune", str(base), str(chats), str(tmp_path / "o4"), "--steps", "0"], "steps must be >= 1"),
        (["finetune", str(base), str(chats), str(tmp_path / "o5"), "--resume"], "no checkpoint to resume"),
        (["merge", str(base), str(tmp_path / "no-adapter"), str(tmp_path / "o6")], "no such adapter"),
        (["merge", str(tmp_path / "no-model"), str(tmp_path), str(tmp_path / "o7")], "no-model"),
    ]
    for argv, message in cases:
        assert corral(argv) == 1, argv
        line = one_error_line(capsys)
        assert line.startswith("corral: error: ") and message in line, (argv, line)
