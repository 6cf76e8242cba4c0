"""`python -m export.tiny_models`: every registered family's tiny checkpoints, and one-line refusals."""

import pytest

from export.families import FAMILIES
from export.tiny_models import main


def test_every_registered_family_has_a_tiny_test_model():
    missing = sorted(a.family for a in FAMILIES.values() if not a.TINY_VARIANTS)
    assert not missing, f"registered families without a tiny test model: {missing}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "qwen2.5-vl", "--backbone", "qwen2.5-vl-7b-slice"], "needs a number of decoder layers"),
        (["--family", "llava", "--backbone", "qwen2.5-vl-7b-slice", "--layers", "2"], "has no tiny variant"),
        (["--family", "qwen2-vl", "--streamed"], "written whole, in fp32"),
    ],
)
def test_a_variant_its_family_lacks_is_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_help_lists_each_familys_variants(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for adapter in FAMILIES.values():
        assert adapter.family in out and all(v in out for v in adapter.TINY_VARIANTS)
