"""Numeric CLI flags: a bad value is refused by argparse, naming the flag, before any work starts."""

from __future__ import annotations

import pytest

from launch.cli import build_parser


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "reason"), [
    ("--top-p", "0", "outside (0, 1]"),
    ("--top-p", "1.5", "outside (0, 1]"),
    ("--top-p", "nan", "not a finite number"),
    ("--value-top-p", "-0.2", "outside (0, 1]"),
    ("--temperature", "-1", "below 0.0 (0 draws greedily)"),
    ("--value-temperature", "inf", "not a finite number"),
    ("--top-k", "-3", "below 0 (0 keeps every token)"),
    ("--top-k", "2.5", "not an integer"),
    ("--n", "0", "must be above 0"),
    ("--mean-of", "0", "below 1"),
    ("--keep", "-1", "below 0"),
    ("--labels", "1,x", "not a comma-separated list of integers"),
    ("--labels", "2,-1", "class labels are 0 or more"),
    ("--seed", "99999999999999999999", "outside -2**63..2**63-1"),  # was "Overflow when unpacking long long"
    ("--seed", "-9223372036854775809", "outside -2**63..2**63-1"),
])
def test_sample_flags_refuse_bad_values_by_name(capsys: pytest.CaptureFixture[str], flag: str, value: str,
                                                reason: str) -> None:
    err = _refused(capsys, ["sample", "runs/x/export", f"{flag}={value}"])
    assert f"argument {flag}" in err and reason in err


def test_sample_flags_accept_their_edge_values() -> None:
    args = build_parser().parse_args(["sample", "e", "--top-p", "1", "--temperature", "0", "--top-k", "0",
                                      "--n", "1", "--mean-of", "1", "--labels", "0,3,3"])
    assert (args.top_p, args.temperature, args.top_k, args.n, args.labels) == (1.0, 0.0, 0, 1, [0, 3, 3])
    assert args.value_top_p is None and args.value_temperature is None


@pytest.mark.parametrize("argv", [
    ["train", "configs/demo.yaml", "--stop-after", "-5"],
    ["submit", "configs/demo.yaml", "--cpus", "-1"],
    ["submit", "configs/demo.yaml", "--gpus", "nan"],
    ["queue", "run", "--poll", "0"],
])
def test_other_numeric_flags_refuse_bad_values(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    err = _refused(capsys, argv)
    assert f"argument {argv[-2]}" in err


def test_overrides_may_follow_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import parse_args

    args = parse_args(build_parser(), ["train", "c.yaml", "a=1", "--stop-after", "5", "trainer.steps=9"])
    assert (args.overrides, args.stop_after) == (["a=1", "trainer.steps=9"], 5)
    args = parse_args(build_parser(), ["prepare", "c.yaml", "--no-ray", "data.prepare.samples_per_shard=8"])
    assert args.overrides == ["data.prepare.samples_per_shard=8"] and args.no_ray
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "c.yaml", "--stop-after", "5", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["sample", "export", "--n", "2", "key=value"])  # sample takes no overrides
    assert "unrecognized arguments: key=value" in capsys.readouterr().err


def test_an_empty_export_tag_is_not_taken_for_latest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "c.yaml", "--tag", ""])
    assert "argument --tag: an empty tag" in capsys.readouterr().err


def test_an_empty_images_path_is_not_taken_for_the_default_images(capsys: pytest.CaptureFixture[str]) -> None:
    """A colourisation export then conditioned on its held-out scenes, not the user's images, without a word."""
    assert build_parser().parse_args(["sample", "export"]).images is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "export", "--images", " "])
    assert "argument --images: an empty path" in capsys.readouterr().err
