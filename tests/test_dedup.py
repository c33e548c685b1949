from hypothesis import given
from hypothesis import strategies as st

from refinery.dedup import SeenHashes


@given(st.lists(st.integers(0, 2**64 - 1), max_size=3000))
def test_behaves_like_a_set(keys):
    seen, ref = SeenHashes(expected=1), set()
    for k in keys:
        k = k or 1
        assert seen.add(k) == (k not in ref)
        ref.add(k)
    assert len(seen) == len(ref)


def test_grows_past_its_initial_size():
    seen = SeenHashes(expected=1)
    assert all(seen.add(k * 0x9E3779B97F4A7C15 % 2**64) for k in range(1, 50_000))
    assert not seen.add(0x9E3779B97F4A7C15)
