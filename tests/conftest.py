"""Fixtures shared by the test files: one tiny synthetic data set, built once per test session."""

import pytest

import data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data.py folder of 400 synthetic 32x32 faces (320 / 40 / 40), clean labels, both groups in every split.
    Tests read it and never write into it."""
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    data.main(["synthetic", "--n=400", "--size=32", "--noise=0", "--seed=0", f"--out_dir={out}"])
    return out
