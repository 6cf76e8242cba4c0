from dyvte_rt.cli import main


def test_macs_command_reports_llava_7b_savings(capsys):
    assert main(["macs", "--exit-layer", "15"]) == 0
    out = capsys.readouterr().out
    assert "45." in out and "saved" in out


def test_macs_command_rejects_exit_beyond_last_layer(capsys):
    assert main(["macs", "--exit-layer", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
