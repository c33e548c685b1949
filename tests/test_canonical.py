from __future__ import annotations

import hashlib

import orjson
from hypothesis import given
from hypothesis import strategies as st

from refinery.canonical import canonical_bytes, sig_hash
from refinery.jsonl import dumps_line, read_jsonl

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.floats(
    allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=8)


def reorder(value, rnd):
    """The same JSON value with every object's keys in a shuffled order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: reorder(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [reorder(v, rnd) for v in value]
    return value


@given(json_objects, st.randoms())
def test_key_order_never_changes_the_hash(obj, rnd):
    assert sig_hash(reorder(obj, rnd)) == sig_hash(obj)


@given(json_objects)
def test_canonical_is_sorted_compact_utf8(obj):
    data = canonical_bytes(obj)
    assert b"\n" not in data
    assert data == orjson.dumps(orjson.loads(data), option=orjson.OPT_SORT_KEYS)
    assert sig_hash(obj) == hashlib.sha256(data).hexdigest()
    assert list(orjson.loads(data)) == sorted(obj)


def test_canonical_known_vector():
    assert canonical_bytes({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()
    assert sig_hash({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest()


@given(st.lists(json_objects, max_size=6))
def test_write_read_write_is_byte_identical(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("rt")
    first = b"".join(dumps_line(r) for r in rows)
    (d / "a.jsonl").write_bytes(first)
    back = [line.obj for line in read_jsonl(d / "a.jsonl")]
    assert back == rows
    assert b"".join(dumps_line(r) for r in back) == first
