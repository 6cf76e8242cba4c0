"""Multi-turn chat beyond its parity with one prefill of the whole conversation (the conformance
suite checks that for every family): reset, context, the command."""

import json
import subprocess
import sys

import pytest

from dyvte_rt.api.model import DyvteModel

TURNS = ("what color is the circle on the left?", "and the square?", "how many shapes?")


def test_reset_starts_over_and_later_turns_report_their_own_compute(bundles, sample_image):
    with DyvteModel.load(bundles["qwen2"]) as model:
        chat = model.chat(sample_image, exit="layer:1")
        first = chat.ask(TURNS[0], max_new_tokens=3)
        second = chat.ask(TURNS[1], max_new_tokens=3)
        assert first.visual_tokens == 16 and second.visual_tokens == 0 and second.exit_layer == 1
        assert (
            0 < second.prefill_macs["actual"] < second.prefill_macs["full"]
        )  # shorter contexts above the exit
        assert len(chat.history) == 2
        chat.reset()
        assert chat.history == [] and chat.tokens == 0
        again = chat.ask(TURNS[0], max_new_tokens=3)
        assert again.token_ids == first.token_ids and again.visual_tokens == 16


def test_a_conversation_past_its_context_is_refused_with_a_hint(bundles, sample_image):
    from dyvte_rt.errors import InputError

    with DyvteModel.load(bundles["qwen2"]) as model:
        chat = model.chat(sample_image, context=40)
        answer = chat.ask(TURNS[0], max_new_tokens=64)
        assert (
            answer.finish_reason == "length" and chat.tokens <= 40
        )  # the answer stopped at the context's end
        with pytest.raises(InputError, match="context of 40") as refused:
            chat.ask("what " * 30)
        assert "/reset" in refused.value.one_line()


def test_chat_command_streams_answers_resets_and_leaves(bundles, sample_image):
    # /help and an unknown command are answered on stderr, never sent to the model as questions
    stdin = f"{TURNS[0]}\n\n/help\n{TURNS[1]}\n/image other.png\n/reset\n{TURNS[0]}\n/exit\nnever read\n"
    command = [
        sys.executable,
        "-m",
        "dyvte_rt.cli",
        "chat",
        str(sample_image),
        "--bundle",
        str(bundles["qwen2"]),
    ]
    done = subprocess.run(
        [*command, "--max-new-tokens", "3"], input=stdin, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert (
        len(answers) == 3 and answers[0] == answers[2]
    )  # after /reset the first question gets its first answer
    assert "(conversation reset)" in done.stderr
    assert "/help lists these" in done.stderr and "unknown command /image;" in done.stderr
    as_json = subprocess.run(
        [*command, "--max-new-tokens", "3", "--json"],
        input=f"{TURNS[0]}\n{TURNS[1]}\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    turns = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2] and turns[0]["answer"] == answers[0]
