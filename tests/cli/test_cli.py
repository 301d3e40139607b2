"""The `corral` CLI through its entry point: in-process `main([...])` and the installed `corral` script."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from corral.api import LLM
from corral.cli.main import main


def corral_script() -> list[str]:
    exe = shutil.which("corral", path=os.path.dirname(sys.executable)) or shutil.which("corral")
    assert exe, "the `corral` console script is not installed (pip install -e .)"
    return [exe]


@pytest.fixture
def preloaded(monkeypatch, smollm2_llm):
    """In-process runs reuse the session's loaded SmolLM2 instead of loading it again (the subprocess
    tests below load it for real); returns the list of (args, kwargs) that LLM.chat saw."""
    monkeypatch.setattr(LLM, "load", classmethod(lambda cls, model=None, **kw: smollm2_llm))
    calls = []
    real_chat = smollm2_llm.chat

    def spy(messages, **kwargs):
        calls.append(([dict(m) for m in messages], kwargs))
        return real_chat(messages, **kwargs)

    monkeypatch.setattr(smollm2_llm, "chat", spy)
    return calls


def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("chat", "generate", "model"))
    for argv, words in ((["generate", "--help"], ["--max-tokens", "--temperature", "--top-p", "--top-k", "--min-p",
                                                   "--seed", "--stop", "--repetition-penalty", "--frequency-penalty",
                                                   "--presence-penalty", "--ignore-eos", "--system", "--dtype",
                                                   "--image", "--json"]),
                        (["chat", "--help"], ["--system", "/reset", "Ctrl-C", "--max-tokens"]),
                        (["model", "--help"], ["download", "list", "info", "rm"]),
                        (["model", "download", "--help"], ["--token", "HF_TOKEN"])):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert all(w in out for w in words), (argv, [w for w in words if w not in out])


def test_generate_json_in_process(preloaded, smollm2_llm, capsys):
    rc = main(["generate", "SmolLM2-135M-Instruct", "The capital of France is", "--json", "--temperature", "0",
               "--max-tokens", "6", "--logprobs", "2"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = smollm2_llm.generate("The capital of France is", temperature=0, max_tokens=6)
    assert result["text"] == ref.text and result["completion_tokens"] == ref.completion_tokens
    assert result["prompt_tokens"] == ref.prompt_tokens and result["finish_reason"] == ref.finish_reason
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert len(result["logprobs"]) == len(ref.token_ids) and len(result["logprobs"][0]["top_logprobs"]) == 2


def test_generate_chat_mode_with_system(preloaded, capsys):
    rc = main(["generate", "smollm2", "Hi", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "4",
               "--stop", "zzz", "--json"])
    assert rc == 0
    messages, kwargs = preloaded[-1]
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert kwargs["params"].stop == ["zzz"] and kwargs["params"].max_tokens == 4
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["message"]["role"] == "assistant"


def test_scripted_chat_multiline_reset_and_ctrl_c(preloaded, smollm2_llm, monkeypatch, capsys):
    script = '"""\nfirst line\nsecond line\n"""\ncontinued \\\nhere\n/reset\nstop me\nafter\n/exit\nnever read\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    real_chat = smollm2_llm.chat  # the spy installed by `preloaded`

    def chat(messages, **kwargs):
        if messages[-1]["content"] == "stop me":  # Ctrl-C in the middle of a streamed reply
            def interrupted():
                yield from []
                raise KeyboardInterrupt
            preloaded.append(([dict(m) for m in messages], kwargs))
            return interrupted()
        return real_chat(messages, **kwargs)

    monkeypatch.setattr(smollm2_llm, "chat", chat)
    rc = main(["chat", "--system", "You are terse.", "--temperature", "0", "--max-tokens", "3"])
    assert rc == 0
    seen = [m for m, _ in preloaded]
    system = {"role": "system", "content": "You are terse."}
    assert seen[0] == [system, {"role": "user", "content": "first line\nsecond line"}]
    assert seen[1][0] == system and seen[1][-1] == {"role": "user", "content": "continued \nhere"}
    assert len(seen[1]) == 4  # system, first turn, its reply, this turn
    assert seen[2] == [system, {"role": "user", "content": "stop me"}]  # /reset kept only the system prompt
    assert seen[3][-1]["content"] == "after" and len(seen) == 4  # the chat went on after Ctrl-C; /exit ended it
    captured = capsys.readouterr()
    assert "[stopped]" in captured.out and "(conversation reset)" in captured.err


def test_generate_errors_in_process(preloaded, capsys, tmp_path):
    assert main(["generate", "smollm2", "word " * 9000, "--max-tokens", "8"]) == 1
    err = capsys.readouterr().err
    assert "corral: error:" in err and "8192" in err and "Traceback" not in err
    monkeypatch_free = main(["generate", str(tmp_path / "missing.gguf"), "hi", "--top-p", "0"])
    assert monkeypatch_free == 1 and "top_p must be > 0" in capsys.readouterr().err


def test_script_generate_json_end_to_end(smollm2_gguf, smollm2_llm):
    """The installed script loads the real model from disk and agrees with the in-process API."""
    proc = subprocess.run(corral_script() + ["generate", str(smollm2_gguf), "The capital of France is", "--json",
                                             "--temperature", "0", "--max-tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("text", "prompt_tokens", "completion_tokens", "finish_reason", "prefill_tokens_per_s",
                "decode_tokens_per_s"):
        assert key in result
    assert result["text"] == smollm2_llm.generate("The capital of France is", temperature=0, max_tokens=5).text


def test_script_chat_session_over_stdin(smollm2_gguf):
    """A real chat session: the same question before and after /reset gets the same greedy reply."""
    script = "What is 2+2?\n/reset\nWhat is 2+2?\n"
    proc = subprocess.run(corral_script() + ["chat", str(smollm2_gguf), "--temperature", "0", "--max-tokens", "8"],
                          input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) == 2 and replies[0] == replies[1], proc.stdout
    assert "(conversation reset)" in proc.stderr


@pytest.mark.parametrize("argv,words", [
    (["generate", "no-such-model", "hi"], "not a known model name"),
    (["generate", "smollm2", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["model", "download", "meta-llama/Llama-3.2-1B"], "cannot reach the Hugging Face hub"),
])
def test_script_bad_inputs_exit_nonzero_without_traceback(argv, words, tmp_path):
    # Nothing downloaded, nothing fetched; the hub client is told it is offline.
    env = {**os.environ, "CORRAL_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(corral_script() + argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_model_errors_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    assert main(["model", "info", "no-such-model"]) == 1
    assert "not a known model name" in capsys.readouterr().err
    assert main(["model", "download", "nonsense"]) == 1
    assert "unknown model 'nonsense'" in capsys.readouterr().err
    assert main(["model", "info", "Llama-3.2-1B", "--json"]) == 0  # known, not downloaded: the registry's numbers
    info = json.loads(capsys.readouterr().out)
    assert info["downloaded"] is False and info["n_layers"] == 16 and "corral model download" in info["hint"]


def test_model_list_and_info(smollm2_gguf, capsys):
    assert main(["model", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["SmolLM2-135M-Instruct"]["downloaded"] and rows["SmolLM2-135M-Instruct"]["format"] == "gguf"
    assert rows["Llama-3.2-1B-Instruct"]["params"] == 1_235_814_400
    assert main(["model", "info", str(smollm2_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["quantization"], info["context_length"], info["n_layers"], info["format"]) == ("Q4_1", 8192, 30, "gguf")


def test_model_rm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    model_dir = tmp_path / "models" / "Llama-3.2-1B"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    assert main(["model", "rm", "llama3.2-1b"]) == 0 and not model_dir.exists()
    assert main(["model", "rm", "llama3.2-1b"]) == 1
    assert "not downloaded" in capsys.readouterr().err


def test_script_generate_int8(smollm2_gguf, smollm2_llm):
    """--quantize int8 end to end: the installed script quantizes the real model at load, decodes with
    Corral's int8 kernel, and agrees with the in-process API loaded the same way; the answer survives
    quantization."""
    from corral.api import LLM

    prompt = "The capital of France is"
    proc = subprocess.run(corral_script() + ["generate", str(smollm2_gguf), prompt, "--json", "--quantize", "int8",
                                             "--temperature", "0", "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    int8 = LLM.load(smollm2_gguf, quantize="int8")
    assert int8.model.output.packed is not None  # the kernel's layout: this machine builds the kernel
    ref = int8.generate(prompt, temperature=0, max_tokens=12)
    assert result["text"] == ref.text and result["completion_tokens"] == ref.completion_tokens == 12
    assert "Paris" in ref.text and "Paris" in smollm2_llm.generate(prompt, temperature=0, max_tokens=12).text
