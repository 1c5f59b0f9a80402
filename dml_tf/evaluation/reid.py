"""Person re-identification retrieval metrics: the Market-1501 protocol, CMC and mAP.

Features of the last pooling layer are L2-normalised and compared by Euclidean distance
(paper Sec. 4.1). `evaluate` implements the benchmark's protocol (Zheng et al., ICCV 2015):
for each query, the gallery images of the query's identity taken by the query's camera and
the junk images (identity -1) are removed from its ranking; distractors (identity 0) stay
and count as wrong matches. Queries without any remaining correct match are skipped.

AP is by default the mean of the precision at each correct match, the form of the widely
used Python evaluations (open-reid / torchreid `eval_market1501`). The benchmark's own
MATLAB kit (`compute_AP.m`) instead averages, at each correct match, the precision there
and at the rank just above it (a trapezoid under the precision-recall curve), which gives
slightly lower numbers when correct matches rank low; `average_precision="trapezoid"`
reproduces it. The paper's released code only exports features as .mat files, presumably
for that kit.

Everything runs on numpy arrays on the CPU; a Market-sized problem (3,368 x 19,732) takes a
few seconds (bench/reid_eval_speed.py).
"""

import concurrent.futures
import os

import numpy as np

JUNK = -1  # identity of Market-1501's junk gallery images: ignored in every ranking
DISTRACTOR = 0  # identity of its distractors: kept in the ranking, never a correct match


def l2_normalize(features, epsilon=1e-12):
    """Scales each row to unit Euclidean norm.

    Args:
        features: [N, D] array.
        epsilon: rows with a smaller norm are divided by `epsilon` instead, so an all-zero
            row stays zero rather than becoming NaN.

    Returns:
        float32 [N, D] array.
    """
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, epsilon)


def euclidean_distances(query_features, gallery_features):
    """Euclidean distances between every query and every gallery feature.

    Computed as sqrt(|q|^2 + |g|^2 - 2 q.g) with one float32 matrix product (for
    L2-normalised features this is sqrt(2 - 2 q.g)). The square root does not change any
    ranking; it is kept so that the values are true distances. Rounding can make the
    squared distance of near-identical features slightly negative, hence the clip at 0.

    Args:
        query_features: [Q, D] array.
        gallery_features: [G, D] array.

    Returns:
        float32 [Q, G] array (one buffer: the product is turned into distances in place).
    """
    q = np.asarray(query_features, dtype=np.float32)
    g = np.asarray(gallery_features, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features must be [Q, D] and [G, D], got {q.shape} and {g.shape}.")
    distances = q @ g.T
    distances *= -2.0
    distances += np.einsum("ij,ij->i", q, q)[:, None]
    distances += np.einsum("ij,ij->i", g, g)[None, :]
    np.maximum(distances, 0.0, out=distances)
    return np.sqrt(distances, out=distances)


def _order_keys(distances):
    """uint64 keys of a block of float32 rows that sort like (row, distance, column).

    The float's bits are made order-preserving as an unsigned integer (negatives get all
    bits flipped, the others only the sign bit) and packed between the row above and the
    column below, so every key is unique and ties in distance go to the lower column.

    Returns:
        (keys [R, C] uint64, row_shift): `keys >> row_shift` is the row.
    """
    num_rows, num_cols = distances.shape
    col_bits = max(1, (num_cols - 1).bit_length())
    bits = (distances + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into +0.0: a tie
    keys = (bits ^ ((bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF)
                    | np.uint32(0x80000000))).astype(np.uint64)
    keys <<= np.uint64(col_bits)
    keys |= np.arange(num_cols, dtype=np.uint64)
    row_shift = 32 + col_bits
    keys |= (np.arange(num_rows, dtype=np.uint64) << np.uint64(row_shift))[:, None]
    return keys, row_shift


def _evaluate_chunk(distances, q_pids, q_camids, g_pids, g_camids, trapezoid):
    """Per-query rank of the first correct match (0: none) and AP for a block of rows.

    Only the ranks of the correct matches matter, and they are few per query, so instead
    of sorting each row (O(G log G)) every kept image is located among the sorted keys of
    the correct matches (O(G log k)): counting kept images per slot and accumulating gives,
    for each correct match, how many kept images rank at or above it. About 2.5x less CPU
    than sorting the rows (bench/reid_eval_speed.py).
    """
    num_q = distances.shape[0]
    same_pid = g_pids[None, :] == q_pids[:, None]
    removed = same_pid & (g_camids[None, :] == q_camids[:, None])
    good = same_pid & ~removed
    kept = ~removed
    keys, row_shift = _order_keys(distances)
    good_keys = np.sort(keys[good])  # by row, then distance, then column
    slots = np.searchsorted(good_keys, keys[kept])  # correct matches ranked above each
    n = len(good_keys)
    # Kept images (all rows of the block) ranked at or above each correct match, itself
    # included, minus those of the earlier rows: its rank among its query's kept images.
    at_or_above = np.cumsum(np.bincount(slots, minlength=n + 1)[:n])
    kept_per_row = kept.sum(axis=1)
    rows = (good_keys >> np.uint64(row_shift)).astype(np.intp)
    ranks = at_or_above - (np.cumsum(kept_per_row) - kept_per_row)[rows]
    num_good = np.bincount(rows, minlength=num_q)
    starts = np.cumsum(num_good) - num_good
    hits = np.arange(n) - starts[rows] + 1  # correct matches up to and including this one
    precision = hits / ranks
    if trapezoid:
        # compute_AP.m: the mean with the precision one rank higher (1 above rank 1).
        precision = (precision + np.where(ranks > 1, (hits - 1) / np.maximum(ranks - 1, 1),
                                          1.0)) / 2
    ap = np.bincount(rows, weights=precision, minlength=num_q) / np.maximum(num_good, 1)
    first = np.zeros(num_q, dtype=np.int64)
    valid = num_good > 0
    first[valid] = ranks[starts[valid]]
    return first, ap


def _checked_inputs(distmat, q_pids, q_camids, g_pids, g_camids, max_rank, average_precision,
                    chunk_size):
    """`evaluate`'s arguments as arrays (int64 ids), or ValueError naming the one that is wrong."""
    if average_precision not in ("mean", "trapezoid"):
        raise ValueError(f"average_precision must be 'mean' or 'trapezoid', got "
                         f"{average_precision!r}.")
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be [Q, G], got shape {distmat.shape}.")
    num_q, num_g = distmat.shape
    q_pids, q_camids, g_pids, g_camids = (
        np.asarray(a, dtype=np.int64).reshape(-1) for a in (q_pids, q_camids, g_pids, g_camids))
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise ValueError(f"distmat has {num_q} query rows but {len(q_pids)} q_pids and "
                         f"{len(q_camids)} q_camids.")
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise ValueError(f"distmat has {num_g} gallery columns but {len(g_pids)} g_pids and "
                         f"{len(g_camids)} g_camids.")
    if max_rank < 1 or chunk_size < 1:
        raise ValueError(f"max_rank and chunk_size must be >= 1, got {max_rank}, {chunk_size}.")
    if np.isnan(distmat).any():
        raise ValueError("distmat has NaN distances; check the features for NaN.")
    return distmat, q_pids, q_camids, g_pids, g_camids


def evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
             average_precision="mean", chunk_size=128, workers=None):
    """CMC and mAP under the Market-1501 protocol.

    For each query, gallery images with the query's identity *and* camera are removed, as
    are junk images (identity -1); distractors (identity 0) stay. Ranking is by increasing
    distance, ties broken by gallery order. Among the remaining images:
      AP = (1 / #correct) * sum over correct matches of (#correct up to it / its rank)
           (with average_precision="trapezoid", each term is averaged with the precision
           at the rank above, taken as 1 above rank 1, as the benchmark's MATLAB kit does),
      cmc[k-1] = fraction of valid queries whose first correct match has rank <= k.
    A query is valid if at least one correct match remains; the others are skipped in both
    averages.

    Distances are compared as float32 (what `euclidean_distances` returns): wider input is
    rounded first, so values closer than float32 resolution tie.

    Queries are processed in blocks of `chunk_size` rows on `workers` threads (numpy
    releases the GIL in the heavy steps); each block needs about chunk_size x G x 30 bytes
    beside `distmat` itself.

    Args:
        distmat: [Q, G] distances, any real dtype; +inf is allowed, NaN is not.
        q_pids: [Q] integer identities of the queries (real identities, not -1 or 0).
        g_pids: [G] integer identities of the gallery images.
        q_camids: [Q] integer camera ids of the queries.
        g_camids: [G] integer camera ids of the gallery images.
        max_rank: length of the returned CMC curve (it may exceed the gallery size).
        average_precision: "mean" (open-reid / torchreid) or "trapezoid" (MATLAB kit).
        chunk_size: query rows per block.
        workers: threads; None: min(4, number of CPUs).

    Returns:
        (cmc, mAP): float64 [max_rank] cumulative match characteristic (fractions), and
        mAP as a Python float (fraction).

    Raises:
        ValueError: mismatched shapes, NaN distances, or no query has a correct match.
    """
    distmat, q_pids, q_camids, g_pids, g_camids = _checked_inputs(
        distmat, q_pids, q_camids, g_pids, g_camids, max_rank, average_precision, chunk_size)
    # Junk is removed for every query alike, so its columns go once, up front.
    keep = g_pids != JUNK
    drop_junk = not keep.all()
    g_pids, g_camids = g_pids[keep], g_camids[keep]
    # A block's keys hold its row above 32 float bits and the column bits.
    chunk_size = min(chunk_size, 1 << (32 - max(1, (len(g_pids) - 1).bit_length())))

    def run(start):
        block = np.asarray(distmat[start:start + chunk_size], dtype=np.float32)
        if drop_junk:
            block = block[:, keep]
        stop = start + len(block)
        return _evaluate_chunk(block, q_pids[start:stop], q_camids[start:stop],
                               g_pids, g_camids, average_precision == "trapezoid")

    workers = workers or min(4, os.cpu_count() or 1)
    starts = range(0, len(distmat), chunk_size)
    if workers == 1 or len(starts) == 1:
        results = [run(s) for s in starts]
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(run, starts))
    first = np.concatenate([r[0] for r in results])
    ap = np.concatenate([r[1] for r in results])
    valid = first > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a correct match in the gallery under another camera, "
                         "so CMC and mAP are undefined; check the query and gallery ids.")
    # first rank r counts towards cmc[r-1:]; ranks beyond max_rank never enter the curve.
    counts = np.bincount(np.minimum(first[valid], max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(counts[1:max_rank + 1]) / num_valid
    return cmc, float(ap[valid].mean())


def multi_query_features(query_pids, query_camids, mq_features, mq_pids, mq_camids,
                         pooling="mean", query_features=None):
    """Market-1501's multi-query features: pool each query's gt_bbox images.

    A query's feature becomes the mean (or element-wise max) of the features of all
    `gt_bbox` images of its identity under its camera (Zheng et al. 2015; paper Sec. 4.1).
    Pass L2-normalised features if they should weigh equally; `evaluate_features`
    normalises the pooled result again.

    Args:
        query_pids: [Q] identities of the queries.
        query_camids: [Q] cameras of the queries.
        mq_features: [M, D] features of the gt_bbox images.
        mq_pids: [M] identities of the gt_bbox images.
        mq_camids: [M] cameras of the gt_bbox images.
        pooling: "mean" or "max".
        query_features: optional [Q, D] single-query features, used for a query that has no
            gt_bbox image of its identity and camera. Without them such a query is an error.

    Returns:
        float32 [Q, D] pooled features, row i for query i.

    Raises:
        ValueError: unknown pooling, mismatched shapes, or a query without gt_bbox images
            and no `query_features`.
    """
    if pooling not in ("mean", "max"):
        raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}.")
    mq_features = np.asarray(mq_features, dtype=np.float32)
    q_pids = np.asarray(query_pids, dtype=np.int64).reshape(-1)
    q_cams = np.asarray(query_camids, dtype=np.int64).reshape(-1)
    m_pids = np.asarray(mq_pids, dtype=np.int64).reshape(-1)
    m_cams = np.asarray(mq_camids, dtype=np.int64).reshape(-1)
    if mq_features.ndim != 2 or not len(m_pids) == len(m_cams) == len(mq_features):
        raise ValueError(f"mq_features must be [M, D] with M ids and cameras, got "
                         f"{mq_features.shape}, {len(m_pids)} ids, {len(m_cams)} cameras.")
    if len(q_cams) != len(q_pids):
        raise ValueError(f"{len(q_pids)} query ids but {len(q_cams)} query cameras.")
    out = np.empty((len(q_pids), mq_features.shape[1]), dtype=np.float32)
    found = np.zeros(len(q_pids), dtype=bool)
    if len(m_pids):
        pooled, groups = _pool_groups(mq_features, m_pids, m_cams, pooling)
        # Locate each query's group among the sorted unique (pid, camid) rows.
        group_keys = groups[:, 0] * (1 << 32) + groups[:, 1]
        query_keys = q_pids * (1 << 32) + q_cams
        at = np.minimum(np.searchsorted(group_keys, query_keys), len(group_keys) - 1)
        found = group_keys[at] == query_keys
        out[found] = pooled[at[found]]
    if not found.all():
        if query_features is None:
            raise ValueError(f"{int((~found).sum())} of {len(q_pids)} queries have no gt_bbox "
                             f"image of their identity and camera; pass query_features to "
                             f"fall back to their own feature.")
        query_features = np.asarray(query_features, dtype=np.float32)
        if query_features.shape != out.shape:
            raise ValueError(f"query_features must be {out.shape}, got {query_features.shape}.")
        out[~found] = query_features[~found]
    return out


def _pool_groups(features, pids, camids, pooling):
    """Mean or max of the features of each (pid, camid) group.

    Returns:
        (pooled [n, D] float32, groups [n, 2] int64 (pid, camid) rows in sorted order).
    """
    groups, inverse = np.unique(np.stack([pids, camids], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    # Sort the images by group so that each group is one run for reduceat.
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(groups)))
    grouped = features[order]
    if pooling == "max":
        return np.maximum.reduceat(grouped, bounds, axis=0), groups
    sums = np.add.reduceat(grouped.astype(np.float64), bounds, axis=0)
    sizes = np.bincount(inverse, minlength=len(groups))
    return (sums / sizes[:, None]).astype(np.float32), groups


def evaluate_features(query_features, gallery_features, q_pids, g_pids, q_camids, g_camids,
                      average_precision="mean"):
    """L2-normalise, Euclidean distances, Market-1501 protocol: the paper's numbers.

    Args:
        query_features: [Q, D] features (single- or multi-query).
        gallery_features: [G, D] features.
        q_pids, g_pids, q_camids, g_camids: as for `evaluate`.
        average_precision: as for `evaluate`.

    Returns:
        {"mAP", "rank1", "rank5", "rank10"}: Python floats, fractions.
    """
    distmat = euclidean_distances(l2_normalize(query_features), l2_normalize(gallery_features))
    cmc, mean_ap = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10,
                            average_precision=average_precision)
    return {"mAP": mean_ap, "rank1": float(cmc[0]), "rank5": float(cmc[4]),
            "rank10": float(cmc[9])}
