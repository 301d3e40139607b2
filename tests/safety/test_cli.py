"""`corral guard` and `corral chat --shield` on a tiny random guard (verdicts forced by the test-only bias)."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from corral.cli.main import main as corral_main
from corral.safety.guard import TEST_VERDICTS_ENV
from corral.safety.moderation import REFUSAL
from corral.safety.prompt import guard_prompt
from tests.safety.tiny_guard import write_text_guard

VERDICTS = [["BOMB", "unsafe\nS9"], ["OUTPUTBAD[\\s\\S]*Agent: ", "unsafe\nS1"], ["", "safe"]]


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    return write_text_guard(tmp_path_factory.mktemp("cli-guard") / "guard")


def run(argv, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = corral_main(argv)
    finally:
        sys.stdin = old
    return code, out.getvalue(), err.getvalue()


def test_show_prompt_loads_no_weights(monkeypatch):
    from corral.api import LLM

    monkeypatch.setattr(LLM, "load", classmethod(lambda *a, **k: pytest.fail("weights were loaded")))
    code, out, _ = run(["guard", "--show-prompt", "Is this <|eot_id|> ok?"])
    assert code == 0 and out == guard_prompt([{"role": "user", "content": "Is this <|eot_id|> ok?"}]) + "\n"
    code, out, _ = run(["guard", "--show-prompt", "Sure.", "--role", "agent", "--user", "Q?", "--model",
                        "Llama-Guard-3-8B", "--exclude", "S14"])
    dialog = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Sure."}]
    assert out.rstrip("\n") == guard_prompt(dialog, "Llama-Guard-3-8B", excluded=["S14"])
    assert run(["guard", "--show-prompt", "x", "--exclude", "S99"])[0] == 1


def test_guard_verdicts(guard_dir, monkeypatch):
    monkeypatch.setenv(TEST_VERDICTS_ENV, json.dumps(VERDICTS))  # test only
    flags = ["--model", str(guard_dir), "--variant", "Llama-Guard-3-1B"]
    code, out, _ = run(["guard", "How to build a BOMB", "--json", *flags])
    result = json.loads(out)
    assert code == 0 and result["verdict"] == "unsafe" and result["categories"] == [
        {"code": "S9", "name": "Indiscriminate Weapons"}]
    assert sorted(result["category_scores"]) == sorted(f"S{i}" for i in range(1, 14))
    code, out, _ = run(["guard", "Hello", *flags])
    assert (code, out) == (0, "safe\n")
    code, out, _ = run(["guard", "some answer", "--role", "agent", "--user", "OUTPUTBAD", *flags])
    assert out == "unsafe: S1 Violent Crimes\n"
    code, _, err = run(["guard", "hi", "--image", "x.png", *flags])
    assert code == 1 and "error" in err


def test_chat_with_a_shield(guard_dir, monkeypatch):
    monkeypatch.setenv(TEST_VERDICTS_ENV, json.dumps(VERDICTS))  # test only
    stdin = "Hello\nhow to make a BOMB\nOUTPUTBAD please\n/exit\n"
    code, out, err = run(["chat", str(guard_dir), "--shield", str(guard_dir), "--max-tokens", "8",
                          "--temperature", "0"], stdin)
    assert code == 0, err
    # the second message was refused before the model ran; the third one's answer before any of it was printed
    assert out.endswith(f"\n{REFUSAL}\n{REFUSAL}\n") and out.count(REFUSAL) == 2


def test_guard_an_image_with_the_vision_guard(tmp_path, monkeypatch):
    from PIL import Image

    from tests.safety.tiny_guard import write_vision_guard

    monkeypatch.setenv(TEST_VERDICTS_ENV, json.dumps([["<image>", "unsafe\nS12"], ["", "safe"]]))  # test only
    vision = write_vision_guard(tmp_path / "vision")
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), "green").save(image)
    flags = ["--model", str(vision), "--variant", "Llama-Guard-3-11B-Vision", "--dtype", "fp32", "--json"]
    code, out, err = run(["guard", "What is this?", "--image", str(image), *flags])
    assert code == 0, err
    assert json.loads(out)["categories"] == [{"code": "S12", "name": "Sexual Content"}]
    assert json.loads(run(["guard", "What is this?", *flags])[1])["verdict"] == "safe"
