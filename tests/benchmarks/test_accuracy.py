"""python -m bench.accuracy on a small random model: every path measured, float32 against
itself exact, the errors ordered as the formats' resolutions are, bad input a one-line error."""

import json

import pytest

from bench import accuracy


def test_every_path_is_measured_and_ordered(hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "acc.json"
    code = accuracy.main(["--target", str(hf_checkpoint("small")), "--positions", "64", "--outliers", "2x30",
                          "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "planted outliers (2 channels x 30" in table
    rec = json.loads(out.read_text())
    assert len(rec) == 2
    for rows in rec.values():
        by = {r["path"]: r for r in rows}
        assert list(by) == list(accuracy.PATHS)
        assert by["float32"]["top1"] == 1.0 and by["float32"]["kl"] == 0.0 and by["float32"]["max_logit_diff"] == 0.0
        assert 0 < by["int8wo"]["kl"] < by["int4"]["kl"]  # 8-bit weights against 4-bit ones
        assert by["int4"]["MB_per_token"] < by["int8"]["MB_per_token"] < by["float32"]["MB_per_token"] / 3
        ppl = {p: r["ppl"] for p, r in by.items()}
        assert all(v > 1 for v in ppl.values())


@pytest.mark.parametrize("args, message", [(["--outliers", "lots"], "NxF"), (["--positions", "1"], "at least 2")])
def test_bad_arguments_exit_2(hf_checkpoint, capsys, args, message):
    target = str(hf_checkpoint("small"))  # written first: transformers' progress bar is not the CLI's output
    capsys.readouterr()
    assert accuracy.main(["--target", target, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
