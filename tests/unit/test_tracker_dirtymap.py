"""DirtyMap against the pure-Python reference, plus the edges the reference cannot show."""

import random
import threading
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.tracker import DirtyMap
from vscsi.tracker.reference import ReferenceDirtyMap

GRAIN = 512


@st.composite
def geometry(draw: st.DrawFn) -> int:
    grains = draw(st.integers(1, 300))
    return grains * GRAIN - draw(st.sampled_from([0, 0, 1, 100, GRAIN - 1]))


def rng(size: int) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(0, size + 2 * GRAIN), st.integers(0, size // 2 + GRAIN))


def ops(size: int) -> st.SearchStrategy[tuple]:
    r = rng(size)
    return st.one_of(
        st.tuples(st.sampled_from(["mark", "clear", "test"]), r),
        st.tuples(st.just("mark_many"), st.lists(r, max_size=24)),
        st.tuples(st.just("extents"), r),
        st.tuples(st.sampled_from(["next_extent", "drain"]), r),
        st.tuples(st.sampled_from(["or", "sub", "and", "eq"]), st.lists(r, max_size=5)),
        st.tuples(st.sampled_from(["count", "dirty_bytes", "roundtrip", "copy"]), st.none()),
    )


def apply(m, other, op: str, arg):
    """Runs one operation on a map (C or reference); returns what must agree."""
    if op in ("mark", "clear", "test"):
        return getattr(m, op)(*arg)
    if op == "mark_many":
        return m.mark_many(array("Q", [o for o, _ in arg]), array("Q", [n for _, n in arg]))
    if op == "extents":
        start, span = arg
        return list(m.extents(start, start + span)), [list(a) for a in m.extents_array(start)]
    if op == "next_extent":
        return m.next_extent(arg[0])
    if op == "drain":  # how a resync steps: clear exactly the run it found
        got = m.next_extent(arg[0])
        return got, (m.clear(*got) if got else 0)
    if op in ("or", "sub", "and", "eq"):
        for o, n in arg:
            other.mark(o, n)
        if op == "or":
            m |= other
        elif op == "sub":
            m -= other
        elif op == "and":
            m &= other
        return m == other
    if op == "roundtrip":
        return type(m).from_bytes(m.to_bytes()) == m if isinstance(m, DirtyMap) else True
    if op == "copy":
        return m.copy() == m
    return getattr(m, op)()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_matches_reference(data: st.DataObject) -> None:
    size = data.draw(geometry())
    c, r = DirtyMap(size, GRAIN), ReferenceDirtyMap(size, GRAIN)
    c2, r2 = DirtyMap(size, GRAIN), ReferenceDirtyMap(size, GRAIN)
    for op, arg in data.draw(st.lists(ops(size), min_size=1, max_size=60)):
        assert apply(c, c2, op, arg) == apply(r, r2, op, arg), (op, arg)
        assert c.count() == r.count()
        assert list(c.extents()) == list(r.extents())
    assert c.dirty_bytes() == r.dirty_bytes()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_dense_batches_match_reference(data: st.DataObject) -> None:
    """Batches long enough for mark_many's private bitmap, against the reference."""
    size = data.draw(geometry())
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    span, most = size + 2 * GRAIN, size // 2 + GRAIN
    ranges = [(rnd.randrange(span), rnd.randrange(most) >> rnd.randrange(20)) for _ in range(4100)]
    c, r = DirtyMap(size, GRAIN), ReferenceDirtyMap(size, GRAIN)
    c.mark(*ranges[0])
    r.mark(*ranges[0])
    offs, lens = array("Q", [o for o, _ in ranges]), array("Q", [n for _, n in ranges])
    assert c.mark_many(offs, lens) == r.mark_many(offs, lens)
    assert list(c.extents()) == list(r.extents())
    assert c.count() == r.count()


def test_large_sparse_map_walks_only_dirty() -> None:
    m = DirtyMap(1 << 44, 1 << 16)
    assert m.mark((1 << 43) + 5, 1) == 1
    assert m.mark((1 << 44) - 1, 100) == 1
    assert list(m.extents()) == [(1 << 43, 1 << 16), ((1 << 44) - (1 << 16), 1 << 16)]
    assert m.next_extent((1 << 43) + (1 << 16)) == ((1 << 44) - (1 << 16), 1 << 16)
    assert m.clear(*m.next_extent(0)) == 1
    assert m.count() == 1
    assert m.next_extent(0) == ((1 << 44) - (1 << 16), 1 << 16)


def test_ranges_are_clamped_and_negative_rejected() -> None:
    m = DirtyMap(1000, 512)
    assert m.mark(900, 10**6) == 1
    assert m.mark(5000, 1) == 0
    assert list(m.extents()) == [(512, 488)]
    assert m.dirty_bytes() == 488
    with pytest.raises(OverflowError):
        m.mark(-1, 1)
    with pytest.raises(OverflowError):
        m.mark(0, 1 << 64)


def test_geometry_checks() -> None:
    for size, grain in [(0, 512), (1, 511), (1, 768), (1, 256)]:
        with pytest.raises(ValueError):
            DirtyMap(size, grain)
    a, b = DirtyMap(1 << 20, 512), DirtyMap(1 << 20, 1024)
    for op in ("__ior__", "__isub__", "__iand__"):
        with pytest.raises(ValueError):
            getattr(a, op)(b)
    assert a != b


def test_mark_many_accepts_u64_buffers_only() -> None:
    np = pytest.importorskip("numpy")
    m = DirtyMap(1 << 30)
    assert m.mark_many(np.array([0, 1 << 20], dtype=np.uint64), memoryview(array("Q", [1, 1])))
    assert m.count() == 2
    with pytest.raises(TypeError):
        m.mark_many(array("I", [0]), array("I", [1]))
    with pytest.raises(ValueError):
        m.mark_many(array("Q", [0, 1]), array("Q", [1]))


def test_grow_keeps_marks_and_adds_clean_space() -> None:
    m = DirtyMap(1000, 512)
    m.mark(0, 1000)
    m.grow(5000)
    assert m.size == 5000
    assert list(m.extents()) == [(0, 1024)]
    assert m.mark(4999, 1) == 1
    with pytest.raises(ValueError):
        m.grow(10)


def test_memory_close_to_raw_bitmap() -> None:
    m = DirtyMap(1 << 40, 65536)
    assert m.nbytes <= 1.1 * (2 << 20)


def test_extents_array_outlives_the_map() -> None:
    m = DirtyMap(1 << 30)
    m.mark(65536, 1)
    offs, lens = m.extents_array()
    del m
    assert (list(offs), list(lens)) == ([65536], [65536])


def test_dense_batch_matches_single_marks_on_a_deep_map() -> None:
    """A batch dense enough for the private bitmap, on a map with four levels: the same bits,
    and every one reachable through the summary (extents, and next_extent from 0 while the walk
    clears what it found, so each step descends past summary bits that clears dropped)."""
    rnd = random.Random(7)
    size = GRAIN * 64**3 * 2 - 100
    ranges = [(rnd.randrange(size + GRAIN), rnd.randrange(4 * GRAIN)) for _ in range(20000)]
    batched, single = DirtyMap(size, GRAIN), DirtyMap(size, GRAIN)
    newly = batched.mark_many(
        array("Q", [o for o, _ in ranges]), array("Q", [n for _, n in ranges])
    )
    assert newly == sum(single.mark(o, n) for o, n in ranges) == batched.count()
    assert batched == single
    assert list(batched.extents()) == list(single.extents())
    drained = []
    while (got := batched.next_extent(0)) is not None:
        assert batched.clear(*got) == -(-got[1] // GRAIN)
        drained.append(got)
    assert batched.count() == 0
    assert drained == list(single.extents())


@pytest.mark.parametrize(
    ("grains", "batch"), [(1 << 16, 1), (1 << 17, 4096)], ids=["per-write", "batched"]
)
def test_no_bit_lost_while_clearing(grains: int, batch: int) -> None:
    """Threads mark while another walks next_extent and clears exactly the runs it found, as a
    resync does: what was cleared plus what is left is all marked, and no set bit hides from
    the walk or the count.

    Every grain is marked once, so a mark a racing clear drops stays lost. The batches are
    built before the start so the threads spend their time in the map; the 4096-write ones are
    dense enough for mark_many's private bitmap.
    """
    grain = 4096
    m = DirtyMap(grains * grain, grain)
    order = list(range(grains))
    random.Random(7).shuffle(order)
    plans = [_batches(order[i::3], grain, batch) for i in range(3)]
    cleared: set[int] = set()
    short: list[tuple[int, int, int]] = []  # runs found whose clear did not find them all set
    start, done = threading.Barrier(4), threading.Event()

    def marker(plan: list[tuple[array, array]]) -> None:
        start.wait()
        for offs, lens in plan:
            if batch == 1:
                m.mark(offs[0], lens[0])
            else:
                m.mark_many(offs, lens)

    def clearer() -> None:
        start.wait()
        pos = 0
        while True:
            finished = done.is_set()  # before the walk: no mark can follow a final empty pass
            got = m.next_extent(pos)
            if got is None:
                if finished and pos == 0:
                    return
                pos = 0
                continue
            off, n = got[0], min(got[1], 64 * grain)
            if (was_set := m.clear(off, n)) != n // grain:  # markers only add bits
                short.append((off, n, was_set))
                return  # a clear that misses bits would make this walk go on for ever
            cleared.update(range(off // grain, (off + n) // grain))
            pos = off + n

    threads = [threading.Thread(target=marker, args=(p,)) for p in plans]
    threads.append(threading.Thread(target=clearer))
    for t in threads:
        t.start()
    for t in threads[:3]:
        t.join()
    done.set()
    threads[3].join()
    left = {o // grain for o, _ in m.extents()}
    assert not short
    assert cleared | left == set(order)
    assert m.count() == len(left) == 0


def _batches(grains: list[int], grain: int, batch: int) -> list[tuple[array, array]]:
    """Marks of the given grains (each at an unaligned offset inside it) in batches."""
    chunks = [grains[i : i + batch] for i in range(0, len(grains), batch)]
    return [(array("Q", [g * grain + 7 for g in c]), array("Q", [1] * len(c))) for c in chunks]


@given(st.binary(max_size=200), st.integers(0, 10**6), st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_from_bytes_rejects_garbage(junk: bytes, pos: int, flip: int) -> None:
    good = DirtyMap(100_000, 512)
    good.mark(1000, 5000)
    image = bytearray(good.to_bytes())
    for data in (junk, bytes(image[: pos % len(image)])):
        with pytest.raises(ValueError):
            DirtyMap.from_bytes(data)
    if flip:
        image[pos % len(image)] ^= flip
        with pytest.raises(ValueError):
            DirtyMap.from_bytes(bytes(image))
