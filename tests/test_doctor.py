"""`align doctor` and the tested-version bounds it reports against."""

import sys
from pathlib import Path

import pytest

from align.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST_MOVING = ("transformers", "peft", "accelerate", "datasets", "tokenizers", "trl", "vllm")


def test_doctor_reports_versions_devices_and_fast_paths(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for needle in ("python", "torch", "transformers", "peft", "accelerate", "datasets", "vllm", "amx_tile=",
                   "avx512_bf16=", "absorbed_mla  active", "shared_prefix active", "prefill_cache active",
                   "vLLM MLA backend"):
        assert needle in out, needle
    assert "OUTSIDE THE TESTED RANGE" not in out  # CI installs inside the ranges


def test_doctor_warns_for_a_version_outside_the_tested_range(monkeypatch):
    import align.doctor as doctor

    real = doctor.installed
    monkeypatch.setattr(doctor, "installed", lambda name: "9.0.0" if name == "transformers" else real(name))
    lines, warnings = doctor.version_lines()
    assert any("transformers" in w and "9.0.0" in w and "tested range" in w for w in warnings)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_fast_moving_dependencies_have_tested_upper_bounds():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    from packaging.requirements import Requirement

    bounded = {Requirement(r).name: Requirement(r).specifier for r in reqs}
    for name in FAST_MOVING:
        spec = bounded[name]
        assert any(s.operator in ("<", "<=", "==") for s in spec), f"{name} has no upper bound: {spec}"
