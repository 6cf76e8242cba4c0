"""The one decode state every way to ask shares: stop rules, finish reasons, and streamed text
that is always exactly the final text (stop strings held back until they can no longer match)."""

import numpy as np
import pytest

from dyvte_rt.errors import InputError
from dyvte_rt.runtime.decoding import DecodeState, StopRule, StreamingText
from dyvte_rt.runtime.sampling import Sampler, SamplingConfig
from export.word_tokenizer import EOS, build_word_tokenizer

WORDS = ["three", "top", "red", "green", "blue", "left", "right", "!"]
TOKENIZER = build_word_tokenizer(WORDS)
ID = {w: TOKENIZER.token_to_id(w) for w in [*WORDS, EOS]}


def _logits(token: int) -> np.ndarray:
    logits = np.zeros((1, TOKENIZER.get_vocab_size()), dtype=np.float32)
    logits[0, token] = 1.0
    return logits


def _run(words: list[str], rule: StopRule) -> tuple[DecodeState, list[str]]:
    """Greedy decoding of scripted logits -> (the state, the text released after each token)."""
    state = DecodeState(TOKENIZER, Sampler(SamplingConfig()), rule, first_position=10)
    released = []
    for word in words:
        if state.finished:
            break
        state.accept(_logits(ID[word]))
        released.append(state.take_text())
    return state, released


def test_a_multi_token_stop_string_never_leaks_into_the_stream():
    state, released = _run(["three", "top", "red"], StopRule(8, stop=("three top",)))
    assert state.finish_reason == "stop" and state.tokens == [ID["three"], ID["top"]]
    assert released == ["", ""] and state.text.text == ""  # "three" waited: it could begin the stop string
    state, released = _run(["red", "three", "top", "left"], StopRule(8, stop=("three top",)))
    assert state.text.text == "red" == "".join(released)


def test_held_back_text_is_released_once_it_cannot_match():
    state, released = _run(["three", "red", "top", "blue"], StopRule(4, stop=("three top",)))
    assert released == ["", "three red", " top", " blue"]  # "top" waits for nothing: no stop begins so
    assert state.finish_reason == "length" and "".join(released) == state.text.text == "three red top blue"


def test_end_of_sequence_stops_unless_ignored_and_the_stream_equals_the_text():
    state, released = _run(["red", "green", EOS, "blue"], StopRule(8, eos=frozenset({ID[EOS]})))
    assert state.finish_reason == "stop" and state.tokens[-1] == ID[EOS] and len(state.tokens) == 3
    assert "".join(released) == state.text.text == "red green"
    ignoring = StopRule(4, eos=frozenset({ID[EOS]}), ignore_eos=True)
    state, _ = _run(["red", EOS, "blue", "left"], ignoring)
    assert state.finish_reason == "length" and len(state.tokens) == 4


def test_positions_count_from_the_first_generated_token():
    state, _ = _run(["red", "green"], StopRule(8))
    assert state.next_position == 11  # "green" goes back in at the prompt's length + 1
    assert state.ttft_ms >= 0 and state.latency_ms >= state.ttft_ms


def test_stop_rules_are_checked_before_any_work():
    with pytest.raises(InputError, match="max_new_tokens"):
        StopRule(0)
    with pytest.raises(InputError, match="stop takes up to 4"):
        StopRule(4, stop=("a", "b", "c", "d", "e"))
    with pytest.raises(InputError, match="stop takes up to 4"):
        StopRule(4, stop=("",))


def test_streaming_text_drops_the_leading_space_and_trailing_whitespace():
    text = StreamingText(TOKENIZER)
    pieces = [text.push(ID[w]) for w in ("red", "green")] + [text.finish()]
    assert pieces[0] == "red" and "".join(pieces) == "red green" == text.text
