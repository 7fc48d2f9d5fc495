"""`gradgraph.differences`: the one helper that names, by path, where two configurations differ."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gradgraph.differences import config_differences, describe_differences, jsonable


def test_differences_are_named_by_their_dotted_path_and_index():
    found = {"train": {"lr": 0.1, "epochs": 3}, "widths": [16, 32], "name": "a", "gone": 1}
    expected = {"train": {"lr": 0.2, "epochs": 3}, "widths": [16, 64], "name": "a", "new": 2}
    assert config_differences(found, expected) == [
        ("gone", 1, None), ("new", None, 2), ("train.lr", 0.1, 0.2), ("widths[1]", 32, 64)]
    assert config_differences(found, found) == []
    # lists of other lengths are one leaf: no index is common to both
    assert config_differences({"w": [1]}, {"w": [1, 2]}) == [("w", [1], [1, 2])]
    assert config_differences(1, 2) == [("<value>", 1, 2)]
    assert config_differences({"a": 1}, {"a": 2}, "config") == [("config.a", 1, 2)]


def test_describe_shows_both_values_and_cuts_a_long_list():
    differences = [(f"k{i}", i, i + 1) for i in range(10)]
    text = describe_differences(differences, "checkpoint", "this run", limit=2)
    assert text == "k0: checkpoint 0, this run 1; k1: checkpoint 1, this run 2; and 8 more"


def test_jsonable_gives_what_json_would_hold():
    value = {"path": Path("/x"), "device": torch.device("cpu"), "pair": (1, 2), "nan": math.nan,
             "inf": -math.inf, "np_int": np.int64(3), "np_float": np.float64(0.5), "flag": True, 1: None}
    assert jsonable(value) == {"path": "/x", "device": "cpu", "pair": [1, 2], "nan": None, "inf": None,
                               "np_int": 3, "np_float": 0.5, "flag": True, 1: None}
    assert type(jsonable(np.int64(3))) is int and jsonable(True) is True
    # a tuple rebuilt and a list read back compare equal once normalised
    assert config_differences(jsonable({"w": (1, 2)}), jsonable({"w": [1, 2]})) == []


@pytest.mark.parametrize("bad", [{"a": 1}, [1, 2]])
def test_a_dict_against_a_list_is_one_leaf(bad):
    other = [1, 2] if isinstance(bad, dict) else {"a": 1}
    assert config_differences(bad, other) == [("<value>", bad, other)]
