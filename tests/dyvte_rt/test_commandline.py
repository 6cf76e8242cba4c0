"""The wrapper every entry point runs through: one line per user error, conventional exit codes."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from dyvte_rt.cli.commandline import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    HelpFormatter,
    run_command,
    use_config_defaults,
)
from dyvte_rt.errors import InputError


def test_exit_codes(capsys):
    assert run_command(lambda: None) == 0
    assert run_command(lambda: 3) == 3

    def bad_input():
        raise InputError("the question is empty", hint="ask something")

    assert run_command(bad_input) == EXIT_ERROR == 1
    assert capsys.readouterr().err == "error: the question is empty (hint: ask something)\n"

    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted, interrupted="stopped early") == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "stopped early\n"


def test_defaults_come_from_the_config_and_show_once():
    @dataclass(frozen=True)
    class Config:
        runs: int = 5
        name: str | None = None
        loud: bool = False

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--runs", type=int, help="how many")
    parser.add_argument("--name", help="a name (default: none)")
    parser.add_argument("--loud", action="store_true", help="louder")
    use_config_defaults(parser, Config)
    assert vars(parser.parse_args([])) == {"runs": 5, "name": None, "loud": False}
    text = parser.format_help()
    assert "how many (default: 5)" in text and "default: None" not in text and "(default: False)" not in text


def test_ctrl_c_during_eval_exits_130_with_one_line(bundles, sample_image, tmp_path):
    data = tmp_path / "many.jsonl"
    row = json.dumps({"image": str(sample_image), "question": "what?", "answer": "x"})
    data.write_text((row + "\n") * 5000)
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dyvte_rt.cli",
            "eval",
            "--bundle",
            str(bundles["llama-gqa"]),
            "--data",
            str(data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # a shell's background job (nohup cmd &) starts with SIGINT ignored, and Python keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    deadline = time.monotonic() + 120
    while "q/s" not in seen and time.monotonic() < deadline:  # until questions are being answered
        seen += child.stderr.read(1)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    err = seen + err
    # 130, or death by SIGINT (a shell's 130 too): CPython kills itself at exit when the interrupt
    # landed inside a string exec, such as a dataclass created by a lazy import, caught or not
    assert child.returncode in (130, -signal.SIGINT), err[-2000:]
    assert err.rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_interrupted_is_a_line_of_its_own_after_a_progress_bar(capsys):
    from tqdm import tqdm

    from dyvte_rt.cli.commandline import run_command

    def body() -> None:
        bar = tqdm(total=5, desc="eval", file=sys.stderr)
        bar.update(1)  # drawn with a carriage return, no newline
        raise KeyboardInterrupt

    assert run_command(body) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


def test_interrupted_is_a_line_of_its_own_when_a_bar_is_cut_in_its_first_drawing(capsys, monkeypatch):
    """Ctrl-C inside tqdm's constructor, after its first line went out: the bar never learns it
    printed (no last_print_t), so its close() writes nothing."""
    from tqdm import tqdm

    from dyvte_rt.cli.commandline import run_command

    def first_draw_then_interrupt(self, *args, **kwargs):
        self.sp("eval:   0%|          | 0/5000 [00:00<?, ?q/s]")
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm, "refresh", first_draw_then_interrupt)

    def body() -> None:
        tqdm(range(5000), desc="eval", unit="q", file=sys.stderr)

    assert run_command(body) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


def test_a_missing_extra_stops_a_command_before_its_work_in_one_line(monkeypatch, capsys, tmp_path):
    import time

    import dyvte_rt.cli.extras as extras
    from calibrate import routers

    real = extras._installed
    monkeypatch.setattr(extras, "_installed", lambda name: name != "matplotlib" and real(name))
    monkeypatch.setattr(routers, "calibrate_routers", lambda config: pytest.fail("the work started"))
    started = time.perf_counter()
    code = routers.main(
        ["--model", "demo", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and time.perf_counter() - started < 5
    assert (
        "needs the [calibrate] extra (matplotlib not installed)" in err
        and "pip install 'dyvte-rt[calibrate]'" in err
    )


def test_an_extra_found_missing_later_is_one_line_too(capsys):
    from dyvte_rt.cli.commandline import run_command

    def body():
        raise ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn")

    assert run_command(body) == 1
    assert (
        capsys.readouterr().err == "error: uvicorn is not installed (hint: pip install 'dyvte-rt[serve]')\n"
    )

    def bug():
        raise ModuleNotFoundError("No module named 'dyvte_rt.nothing'", name="dyvte_rt.nothing")

    with pytest.raises(ModuleNotFoundError):  # not an optional extra: a bug keeps its traceback
        run_command(bug)


def test_serve_takes_the_vision_priority_to_the_model_it_opens(monkeypatch, demo_bundle):
    """`dyvte-rt serve --vision-priority low` reaches DyvteModel.load; the default stays normal.
    The bundle is named: a fresh machine has no default one before the quickstart."""
    from dyvte_rt.api.model import DyvteModel
    from dyvte_rt.cli.commands import build_parser
    from dyvte_rt.cli.common import open_model

    asked = []

    def load(cls, *args, **options):
        asked.append(options["vision_priority"])

    monkeypatch.setattr(DyvteModel, "load", classmethod(load))
    for options, expected in (([], "normal"), (["--vision-priority", "low"], "low")):
        args = build_parser().parse_args(["serve", "--bundle", str(demo_bundle), *options])
        open_model(args.make_config(args))
        assert asked.pop() == expected
