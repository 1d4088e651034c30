"""Head labels: parsing the three spellings, formatting, range checks (no model, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrieval_heads.heads import _PATTERNS, Head, parse_heads


@pytest.mark.parametrize(
    "label",
    ["14.7", "14-7", "L14H7", "l14h7", " 14 . 7 ", "14 - 7", "L14 H7", (14, 7), ("14", "7")],
)
def test_parse_spellings(label):
    assert Head.parse(label) == Head(14, 7)


def test_parse_passes_heads_through():
    head = Head(2, 3)
    assert Head.parse(head) is head


def test_formats():
    head = Head(14, 7)
    assert (head.dotted, head.dashed, head.tl, str(head)) == ("14.7", "14-7", "L14H7", "14.7")


def test_order_and_hash():
    assert sorted([Head(1, 0), Head(0, 5), Head(0, 1)]) == [Head(0, 1), Head(0, 5), Head(1, 0)]
    assert len({Head(1, 2), Head.parse("1.2"), Head.parse("L1H2")}) == 1


@pytest.mark.parametrize(
    "label",
    ["", "14", "14.", ".7", "14.7.1", "a.b", "-1.2", "1.-2", "L14", "H7", "14:7", "L1.5H2", "1..2"],
)
def test_malformed_labels_raise(label):
    with pytest.raises(ValueError, match="malformed head label"):
        Head.parse(label)


@pytest.mark.parametrize("label", [None, 1.5, 3, [1, 2], (1, 2, 3), ("a", "b")])
def test_non_string_labels_raise(label):
    with pytest.raises(ValueError):
        Head.parse(label)


def test_check_in_range():
    assert Head(3, 5).check(n_layers=4, n_heads=6) == Head(3, 5)


@pytest.mark.parametrize("head", [Head(4, 0), Head(0, 6), Head(-1, 0), Head(0, -1)])
def test_check_out_of_range(head):
    with pytest.raises(ValueError, match="out of range"):
        head.check(n_layers=4, n_heads=6)


def test_parse_heads_string_and_list():
    assert parse_heads("1.2, 3-4,L5H6,") == [Head(1, 2), Head(3, 4), Head(5, 6)]
    assert parse_heads(["0.1", (2, 3), Head(4, 5)]) == [Head(0, 1), Head(2, 3), Head(4, 5)]
    assert parse_heads("") == []


def test_parse_heads_range_checks_when_shape_given():
    assert parse_heads("0.0,1.1", n_layers=2, n_heads=2) == [Head(0, 0), Head(1, 1)]
    with pytest.raises(ValueError, match="out of range"):
        parse_heads("0.0,2.1", n_layers=2, n_heads=2)


# ---- properties ---------------------------------------------------------------------------

indices = st.integers(min_value=0, max_value=10_000)


@given(layer=indices, head=indices)
def test_every_format_round_trips(layer, head):
    h = Head(layer, head)
    for text in (h.dotted, h.dashed, h.tl, str(h), h.tl.lower()):
        assert Head.parse(text) == h


label_like = st.text(alphabet="0123456789.-LlHh :_x", max_size=10)


@given(st.one_of(st.text(max_size=12), label_like))
def test_garbage_raises_value_error(text):
    if any(p.match(text) for p in _PATTERNS):
        return  # a valid label by construction; covered above
    with pytest.raises(ValueError):
        Head.parse(text)


@given(layer=st.integers(-3, 12), head=st.integers(-3, 12))
def test_check_accepts_exactly_the_model_shape(layer, head):
    inside = 0 <= layer < 8 and 0 <= head < 10
    if inside:
        assert Head(layer, head).check(8, 10) == Head(layer, head)
    else:
        with pytest.raises(ValueError):
            Head(layer, head).check(8, 10)
