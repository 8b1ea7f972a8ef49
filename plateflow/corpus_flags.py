"""The corpus's own quality flags, decided over every plate when plates.parquet is written (a
plate's own flags: plateflow/characterize/quality.py):

- ``odd_size``: tiny (√area under ``min_side``), or a side ``max_factor`` times smaller than the
  corpus median: sizes differ by factors, not by pixels, and a wide fixed factor keeps the flag
  stable. A large plate is what a scanner makes, not a curator's worry;
- ``exact_duplicates``: the decoded pixels of an earlier plate (a PNG and a TIFF of one image);
- ``near_duplicates``: a perceptual hash within ``max_distance`` bits of an earlier plate's.

Each duplicate names the plate it duplicates (``duplicate_of``). Thresholds:
profiles/quality.toml. The decisions are made on columns (``decide``), so a corpus table of 10^5
plates is flagged without a Python object per plate (``corpus_flags_table``); ``corpus_flags``
applies them to rows as dicts. When a few rows of a table whose flags were decided changed,
only the near-duplicate decisions those rows can touch are made again (``decide_changed``):
the same flags as deciding everything, at the cost of the changed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plateflow.flags import PLATE_FLAGS
from plateflow.profiles import QualityProfile

CORPUS_FLAGS = ("odd_size", "exact_duplicates", "near_duplicates")  # in this order after the plate's own
MAX_CHANGED = 64  # beyond this many changed candidates, every near-duplicate is decided again
MAX_TOUCHED = 512  # ... or this many rows within their reach
_BLOCK_ELEMENTS = 2_000_000  # distances computed at once in a crowded bucket
_HEX = np.zeros(256, np.uint8)  # a hex digit's value by its byte
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = _HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


@dataclass
class Decision:
    """Per plate: whether each corpus flag holds, and the plate id it duplicates."""

    odd_size: np.ndarray
    exact_duplicates: np.ndarray
    near_duplicates: np.ndarray
    duplicate_of: list[str | None]


def decide(ok: np.ndarray, width: np.ndarray, height: np.ndarray, pixel_hash: list, phash: list,
           plate_id: list, profile: QualityProfile) -> Decision:
    """The corpus flags of every plate (``ok``: the plates that get flags), in row order: the
    first plate of a group is the original, the later ones duplicate it."""
    odd, exact, dup_of = _odd_and_exact(ok, width, height, pixel_hash, plate_id, profile)
    near = np.zeros(len(ok), bool)
    for later, earlier in _near_pairs(np.flatnonzero(ok & ~exact).tolist(), phash, profile.near_duplicates.max_distance):
        near[later], dup_of[later] = True, plate_id[earlier]
    return Decision(odd, exact, near, dup_of)


def decide_changed(ok: np.ndarray, width: np.ndarray, height: np.ndarray, pixel_hash: list, phash,
                   plate_id: list, profile: QualityProfile, was: Decision, was_ok: np.ndarray, changed: np.ndarray,
                   was_phash: dict[int, str | None]) -> Decision | None:
    """``decide``'s result, given the decision ``was`` made before the rows at ``changed``
    changed (``was_ok`` and ``was_phash``: those rows' status and perceptual hashes then; every
    other row is as it was). A row's near duplicate is the closest, then earliest, earlier
    candidate within the distance, so only rows near a candidate that changed (its hashes
    before or now) can decide otherwise: those are decided again, the rest keep ``was``. Odd
    sizes (a median) and exact duplicates (a pass over strings) are decided again whole.
    None when too many candidates changed for that to pay."""
    odd, exact, dup_of = _odd_and_exact(ok, width, height, pixel_hash, plate_id, profile)
    d = profile.near_duplicates.max_distance
    cand, was_cand = ok & ~exact, was_ok & ~was.exact_duplicates
    moved = np.union1d(np.flatnonzero(cand != was_cand), changed).astype(np.int64)
    if len(moved) > MAX_CHANGED:
        return None
    owner, values = _hash_values(phash, list(range(len(ok))))
    touched = set(moved.tolist())
    for x in moved.tolist():  # every row within reach of what a changed candidate is, or was
        now = values[owner == x]
        before = _hash_values([was_phash[x]], [0])[1] if x in was_phash else now
        for probe in ([now] if cand[x] else []) + ([before] if was_cand[x] else []):
            if len(probe):
                near = (np.bitwise_count(values[None, :] ^ probe[:, None]) <= d).any(axis=0)
                touched.update(owner[near & (owner > x)].tolist())
        if len(touched) > MAX_TOUCHED:  # a crowded hash (blank pages): deciding everything is cheaper
            return None
    near = was.near_duplicates.copy()
    for i in np.flatnonzero(was.near_duplicates).tolist():
        if not exact[i]:
            dup_of[i] = was.duplicate_of[i]
    for b in sorted(touched):
        near[b] = False
        if exact[b] or not cand[b]:
            if not exact[b]:
                dup_of[b] = None
            continue
        dup_of[b] = None
        mine = values[owner == b]
        earlier = (owner < b) & cand[owner]
        if not len(mine) or not earlier.any():
            continue
        dist = np.bitwise_count(values[earlier][None, :] ^ mine[:, None]).min(axis=0)
        rows = owner[earlier]
        within = dist <= d
        if within.any():
            best = np.lexsort((rows[within], dist[within]))[0]  # the closest, then the earliest
            near[b], dup_of[b] = True, plate_id[int(rows[within][best])]
    return Decision(odd, exact, near, dup_of)


def _odd_and_exact(ok: np.ndarray, width: np.ndarray, height: np.ndarray, pixel_hash: list, plate_id: list,
                   profile: QualityProfile) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    n = len(ok)
    odd = np.zeros(n, bool)
    p = profile.odd_size
    idx = np.flatnonzero(ok)
    if len(idx):
        side = np.sqrt(width[idx].astype(np.float64) * height[idx].astype(np.float64))
        median = np.median(side) if len(idx) >= p.min_plates else None
        odd[idx] = (side < p.min_side) | ((median / side > p.max_factor) if median is not None else False)
    exact = np.zeros(n, bool)
    dup_of: list[str | None] = [None] * n
    first: dict[str, int] = {}
    for i in idx.tolist():
        h = pixel_hash[i]
        if not h:
            continue
        if h in first:
            exact[i], dup_of[i] = True, plate_id[first[h]]
        else:
            first[h] = i
    return odd, exact, dup_of


def flags_version(profile: QualityProfile) -> str:
    """What the corpus flags of a table were decided with: the profile's corpus sections and this
    module's code (recorded in plates.parquet's metadata; a table whose rows did not change and
    whose flags were decided with the same version keeps them without deciding again)."""
    from plateflow.caching import code_version, fingerprint

    return fingerprint(profile.odd_size.model_dump_json(), str(profile.near_duplicates.max_distance),
                       code_version("plateflow.corpus_flags"))


def corpus_flags(rows: list[dict], profile: QualityProfile) -> None:
    """Set each row's ``quality_flags`` (its plate flags, then the corpus flags) and
    ``duplicate_of``, in place. Rows of failed plates get no flags."""
    ok = np.array([r.get("status") == "ok" and bool(r.get("width")) for r in rows], bool)
    width = np.array([r.get("width") or 0 for r in rows], np.int64)
    height = np.array([r.get("height") or 0 for r in rows], np.int64)
    d = decide(ok, width, height, [r.get("pixel_hash") for r in rows], [r.get("phash") for r in rows],
               [r.get("plate_id") for r in rows], profile)
    for i, r in enumerate(rows):
        r["duplicate_of"] = d.duplicate_of[i]
        if not ok[i]:
            r["quality_flags"] = None
            continue
        r["quality_flags"] = [f for f in (r.get("quality_flags") or []) if f in PLATE_FLAGS] + [
            f for f in CORPUS_FLAGS if getattr(d, f)[i]]


def corpus_flags_table(table: pa.Table, profile: QualityProfile, changed: np.ndarray | None = None,
                       before: pa.Table | None = None) -> pa.Table:
    """``corpus_flags`` over a corpus table, in Arrow and NumPy: its ``quality_flags`` and
    ``duplicate_of`` columns set from the columns they depend on. ``changed``: the only rows
    that are new since the table's flags were decided (with this profile and code), ``before``
    those rows as they were then; the decision is then ``decide_changed``'s."""
    n = table.num_rows
    ok = _ok(table)
    width = pc.fill_null(table.column("width"), 0).to_numpy().astype(np.int64)
    height = pc.fill_null(table.column("height"), 0).to_numpy().astype(np.int64)
    args = (ok, width, height, table.column("pixel_hash").to_pylist(), table.column("phash"),
            table.column("plate_id").to_pylist(), profile)
    d = None
    if changed is not None and before is not None:
        was = _decided(table, changed, before)
        was_ok = ok.copy()
        was_ok[changed] = _ok(before)
        d = decide_changed(*args, was, was_ok, changed, dict(zip(changed.tolist(), before.column("phash").to_pylist())))
    if d is None:
        d = decide(*args)
    flags = table.column("quality_flags").combine_chunks()
    values = pc.list_flatten(flags)
    parents = pc.list_parent_indices(flags).to_numpy()
    keep = pc.is_in(values, value_set=pa.array(sorted(PLATE_FLAGS), pa.string())).to_numpy(zero_copy_only=False)
    keep &= ok[parents] if len(parents) else keep
    row_parts, order_parts, value_parts = [parents[keep]], [np.flatnonzero(keep)], [values.filter(pa.array(keep))]
    for j, name in enumerate(CORPUS_FLAGS):
        rows = np.flatnonzero(getattr(d, name))
        row_parts.append(rows)
        order_parts.append(np.full(len(rows), len(parents) + j))
        value_parts.append(pa.array([name] * len(rows), pa.string()))
    rows, order = np.concatenate(row_parts), np.concatenate(order_parts)
    sort = np.lexsort((order, rows))
    flat = pa.concat_arrays([v.cast(pa.string()) for v in value_parts]).take(pa.array(sort, pa.int64()))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), flat, mask=pa.array(~ok))
    i = table.schema.get_field_index("quality_flags")
    table = table.set_column(i, table.schema.field(i), column.cast(table.schema.field(i).type))
    i = table.schema.get_field_index("duplicate_of")
    return table.set_column(i, table.schema.field(i), pa.array(d.duplicate_of, pa.string()))


def _ok(table: pa.Table) -> np.ndarray:
    """The rows that get corpus flags: ok plates with a size."""
    width = pc.fill_null(table.column("width"), 0).to_numpy()
    return pc.fill_null(pc.equal(table.column("status"), "ok"), False).to_numpy(zero_copy_only=False) & (width != 0)


def _decided(table: pa.Table, changed: np.ndarray, before: pa.Table) -> Decision:
    """The corpus flags a table records (its rows at ``changed`` as ``before`` records them)."""
    def flags(t: pa.Table) -> dict[str, np.ndarray]:
        column = t.column("quality_flags").combine_chunks()
        values = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy()
        return {name: np.bincount(parents[pc.fill_null(pc.equal(values, name), False).to_numpy(zero_copy_only=False)],
                                  minlength=t.num_rows) > 0 for name in CORPUS_FLAGS}

    now, then = flags(table), flags(before)
    for name in CORPUS_FLAGS:
        now[name][changed] = then[name]
    dup_of = table.column("duplicate_of").to_pylist()
    for i, v in zip(changed.tolist(), before.column("duplicate_of").to_pylist()):
        dup_of[i] = v
    return Decision(now["odd_size"], now["exact_duplicates"], now["near_duplicates"], dup_of)


def _near_pairs(candidates: list[int], phash: list, max_distance: int, big_bucket: int = 256) -> list[tuple[int, int]]:
    """(later, earlier) for each of ``candidates`` (row indices, in order) one of whose
    perceptual hashes lies within ``max_distance`` bits of one of an earlier candidate's: the
    closest, then the earliest, such plate.

    Pigeonhole: two 64-bit hashes within d bits agree exactly on at least one of d + 1 disjoint
    bit ranges, so only hashes sharing a range's value are compared (multi-index hashing): for
    10^5 plates a few million pairs, in NumPy, instead of 5 * 10^9."""
    owner, values = _hash_values(phash, candidates)
    if len(np.unique(owner)) < 2:
        return []
    bounds = np.linspace(0, 64, max_distance + 2).astype(int)
    pairs = [_bucket_pairs((values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1), values, big_bucket,
                           max_distance) for lo, hi in zip(bounds, bounds[1:])]
    a, b = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    distance = np.bitwise_count(values[a] ^ values[b])
    a, b = owner[a], owner[b]  # positions are in row order, so a <= b
    keep = a != b
    a, b, distance = a[keep], b[keep], distance[keep]
    first = np.lexsort((a, distance, b))  # per later plate b: the closest, then the earliest, a
    b_sorted = b[first]
    starts = first[np.r_[True, b_sorted[1:] != b_sorted[:-1]]] if len(first) else first
    return [(int(b[k]), int(a[k])) for k in starts]


def _hash_values(phash: list | pa.Array | pa.ChunkedArray, candidates: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The 64-bit perceptual hashes of the ``candidates`` rows (space-separated hex in
    ``phash``) with the row each belongs to, parsed in Arrow and NumPy."""
    column = pa.array(phash, pa.string()) if isinstance(phash, list) else phash
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    rows = pa.array(candidates, pa.int64())
    tokens = pc.split_pattern(pc.fill_null(column.take(rows), ""), " ")
    owner = np.asarray(candidates, np.int64)[pc.list_parent_indices(tokens).to_numpy()]
    flat = pc.list_flatten(tokens)
    keep = pc.equal(pc.utf8_length(flat), 16).to_numpy(zero_copy_only=False)
    flat = flat.filter(pa.array(keep))
    owner = owner[keep]
    if len(flat) == 0:
        return owner, np.zeros(0, np.uint64)
    text = flat.cast(pa.large_string())
    offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset:text.offset + len(text) + 1]
    chars = np.frombuffer(text.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 16)
    digits = _HEX[chars]  # a uint8 table: a uint64 one is ~30x slower to index from Arrow's memory
    packed = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])  # two digits a byte
    return owner, packed.view(">u8").ravel().astype(np.uint64)


def _bucket_pairs(keys: np.ndarray, values: np.ndarray, big_bucket: int,
                  max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b), a < b, of positions whose keys are equal and whose values lie within
    ``max_distance`` bits: every such pair, but in a run of more than ``big_bucket`` equal keys
    only each position's closest earlier one. Candidates are filtered as they are made, so
    memory follows the pairs found, not the pairs compared."""

    def near(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = np.bitwise_count(values[a] ^ values[b]) <= max_distance
        return a[keep], b[keep]

    order = np.argsort(keys, kind="stable")  # equal keys stay in position order
    k = keys[order]
    run_start = np.r_[0, np.flatnonzero(k[1:] != k[:-1]) + 1]
    run_len = np.diff(np.r_[run_start, len(k)])
    run_of = np.repeat(np.arange(len(run_start)), run_len)
    a_parts, b_parts = [], []
    longest = int(run_len.max(initial=1))
    for d in range(1, min(longest, big_bucket)):  # each offset within a run: O(n) a step
        same = run_of[:-d] == run_of[d:]
        if not same.any():
            break
        a, b = near(order[:-d][same], order[d:][same])
        a_parts.append(a)
        b_parts.append(b)
    for start, length in zip(run_start[run_len > big_bucket], run_len[run_len > big_bucket]):
        # A crowded value (blank pages share one hash): past the offsets above, only each
        # member's closest earlier member, in blocks, never all length^2 / 2 pairs.
        members = order[start:start + length]  # ascending: a stable sort of one key
        block = max(1, min(1024, _BLOCK_ELEMENTS // length))  # a few tens of MB per block, whatever the crowd
        for lo in range(big_bucket, length, block):
            rows = np.arange(lo, min(lo + block, length))
            d = np.bitwise_count(values[members[rows]][:, None] ^ values[members][None, :]).astype(np.int64)
            d[np.arange(length)[None, :] > rows[:, None] - big_bucket] = 1 << 20  # only the earlier, farther ones
            best = np.argmin(d * length + np.arange(length)[None, :], axis=1)
            a, b = near(members[best], members[rows])
            a_parts.append(a)
            b_parts.append(b)
    if not a_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a_parts), np.concatenate(b_parts)
