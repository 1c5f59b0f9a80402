"""Re-ID evaluation: the Market-1501 protocol on cases worked out by hand, and against a
plain per-query loop on random data."""

import numpy as np
import pytest

from dml_tf.evaluation import reid


def test_same_camera_matches_and_junk_are_ignored_distractors_kept():
    # Query: identity 1, camera 1. Gallery by increasing distance:
    #   g0 id 1 cam 1  0.1  removed (same identity, same camera)
    #   g1 id -1 cam 2 0.2  removed (junk)
    #   g2 id 0 cam 2  0.3  rank 1, wrong (distractor)
    #   g3 id 1 cam 2  0.4  rank 2, correct
    #   g4 id 5 cam 1  0.5  rank 3, wrong
    #   g5 id 1 cam 3  0.6  rank 4, correct
    # AP = (1/2 + 2/4) / 2 = 0.5; first correct match at rank 2.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], np.float32)
    cmc, mean_ap = reid.evaluate(distmat, q_pids=[1], g_pids=[1, -1, 0, 1, 5, 1],
                                 q_camids=[1], g_camids=[1, 2, 2, 2, 1, 3], max_rank=5)
    assert mean_ap == pytest.approx(0.5)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1])


def test_trapezoid_average_precision_of_the_matlab_kit():
    # The first case's ranking, correct matches at ranks 2 and 4. compute_AP.m averages the
    # precision at each correct match with the precision one rank above it:
    #   rank 2: (1/2 + 0/1) / 2 = 1/4;  rank 4: (2/4 + 1/3) / 2 = 5/12;
    #   AP = (1/4 + 5/12) / 2 = 1/3.
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], np.float32)
    args = ([1], [1, -1, 0, 1, 5, 1], [1], [1, 2, 2, 2, 1, 3])
    cmc, mean_ap = reid.evaluate(distmat, *args, max_rank=5, average_precision="trapezoid")
    assert mean_ap == pytest.approx(1 / 3)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1])  # CMC does not depend on it
    # A correct match at rank 1 averages with precision 1 above it: perfect stays 1.
    _, perfect = reid.evaluate(np.array([[0.1, 0.2]]), [1], [1, 2], [1], [2, 2],
                               average_precision="trapezoid")
    assert perfect == 1.0
    with pytest.raises(ValueError, match="average_precision"):
        reid.evaluate(distmat, *args, average_precision="interpolated")


def test_queries_without_a_valid_match_are_skipped():
    g_pids, g_camids = [1, 2, 0, 1], [2, 1, 3, 3]
    distmat = np.array([
        # q0 id 1 cam 1: kept order g1 (0.1, wrong), g2 (0.2, wrong), g3 (0.3, correct),
        #   g0 (0.9, correct): AP = (1/3 + 2/4) / 2 = 5/12, first correct at rank 3.
        [0.9, 0.1, 0.2, 0.3],
        # q1 id 2 cam 1: its only gallery image g1 is under camera 1 too: skipped.
        [0.1, 0.2, 0.3, 0.4],
        # q2 id 3: not in the gallery at all: skipped.
        [0.5, 0.5, 0.5, 0.5],
        # q3 id 1 cam 2: g0 removed (camera 2); kept order g3 (0.1, correct), g1, g2:
        #   AP = 1, first correct at rank 1.
        [0.05, 0.5, 0.6, 0.1],
    ], np.float32)
    cmc, mean_ap = reid.evaluate(distmat, [1, 2, 3, 1], g_pids, [1, 1, 2, 2], g_camids,
                                 max_rank=6)
    assert mean_ap == pytest.approx((5 / 12 + 1) / 2)  # = 17/24 over the 2 valid queries
    # Ranks 3 and 1: half the valid queries by rank 1, all by rank 3; the curve stays at 1
    # past the 4 gallery images.
    np.testing.assert_allclose(cmc, [0.5, 0.5, 1, 1, 1, 1])


@pytest.mark.parametrize("first_three, expected_ap, expected_cmc", [
    # Distractors (id 0) ranked first push the correct matches to ranks 4 and 5:
    # AP = (1/4 + 2/5) / 2 = 0.325.
    (0, 0.325, [0, 0, 0, 1, 1]),
    # The same images as junk (-1) are ignored: the matches rank 1 and 2, AP = 1.
    (-1, 1.0, [1, 1, 1, 1, 1]),
])
def test_distractors_ranked_first_lower_ap_and_cmc(first_three, expected_ap, expected_cmc):
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], np.float32)
    g_pids = [first_three] * 3 + [4, 4]
    cmc, mean_ap = reid.evaluate(distmat, [4], g_pids, [1], [2, 3, 5, 2, 3], max_rank=5)
    assert mean_ap == pytest.approx(expected_ap)
    np.testing.assert_allclose(cmc, expected_cmc)


def test_ties_go_to_the_earlier_gallery_image():
    # Both at distance 0.5 (and +0.0 ties -0.0): the earlier column ranks first.
    g_camids = [2, 2]
    for distances, g_pids, expected_ap in [
            ([0.5, 0.5], [2, 1], 0.5),   # wrong match first: the correct one ranks 2
            ([0.5, 0.5], [1, 2], 1.0),
            ([0.0, -0.0], [2, 1], 0.5),
            ([-0.0, 0.0], [2, 1], 0.5)]:
        for dtype in (np.float32, np.float64):
            _, mean_ap = reid.evaluate(np.array([distances], dtype), [1], g_pids, [1], g_camids)
            assert mean_ap == pytest.approx(expected_ap), (distances, g_pids, dtype)


def test_cmc_is_cumulative_fraction_of_first_match_ranks():
    # Three queries of identity 1 under camera 1; the correct image g0 (camera 2) ranks
    # 1st, 2nd and 3rd among 3 wrong images: cmc = [1/3, 2/3, 1, 1].
    distmat = np.array([[0.0, 1, 2, 3], [1.5, 1, 2, 3], [2.5, 1, 2, 3]], np.float32)
    cmc, mean_ap = reid.evaluate(distmat, [1, 1, 1], [1, 7, 8, 9], [1, 1, 1], [2, 2, 2, 2],
                                 max_rank=4)
    np.testing.assert_allclose(cmc, [1 / 3, 2 / 3, 1, 1])
    assert mean_ap == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def loop_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, trapezoid=False):
    """The definition, one query at a time (ties by gallery order, as a stable sort).

    With `trapezoid`, AP is computed as the MATLAB kit's compute_AP.m (as ported to Python
    in layumi/Person_reID_baseline_pytorch): at the i-th correct match (0-based) at 0-based
    position p, add (1/n) * ((i+1)/(p+1) + (i/p if p else 1)) / 2.
    """
    all_cmc, all_ap = [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        keep = (pids != -1) & ~((pids == q_pids[i]) & (cams == q_camids[i]))
        correct = pids[keep] == q_pids[i]
        if not correct.any():
            continue
        ranks = np.flatnonzero(correct) + 1
        if trapezoid:
            ap = 0.0
            for i, p in enumerate(ranks - 1):
                ap += ((i + 1) / (p + 1) + (i / p if p else 1.0)) / 2 / len(ranks)
            all_ap.append(ap)
        else:
            all_ap.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        all_cmc.append(np.arange(1, max_rank + 1) >= ranks[0])
    return np.mean(all_cmc, axis=0), np.mean(all_ap)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_size, workers", [(1000, 1), (7, 2), (1, 1)])
def test_matches_a_per_query_loop_on_random_data(seed, chunk_size, workers):
    rng = np.random.default_rng(seed)
    num_q, num_g = 30, 200
    q_pids = rng.integers(1, 12, num_q)
    g_pids = rng.integers(-1, 12, num_g)  # junk, distractors and 11 identities
    q_camids, g_camids = rng.integers(1, 7, num_q), rng.integers(1, 7, num_g)
    distmat = rng.standard_normal((num_q, num_g)).astype(np.float32)  # signs mixed
    if seed % 2:
        distmat = np.round(distmat * 4) / 4  # many ties
    for average_precision in ("mean", "trapezoid"):
        expected_cmc, expected_ap = loop_reference(distmat, q_pids, g_pids, q_camids, g_camids,
                                                   20, average_precision == "trapezoid")
        cmc, mean_ap = reid.evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20,
                                     average_precision=average_precision,
                                     chunk_size=chunk_size, workers=workers)
        np.testing.assert_allclose(cmc, expected_cmc, rtol=1e-12)
        assert mean_ap == pytest.approx(expected_ap, rel=1e-12)


def test_errors():
    ok = dict(q_pids=[1], g_pids=[1, 2], q_camids=[1], g_camids=[2, 2])
    with pytest.raises(ValueError, match="NaN"):
        reid.evaluate(np.array([[np.nan, 1.0]]), **ok)
    with pytest.raises(ValueError, match="2 gallery columns but 3 g_pids"):
        reid.evaluate(np.zeros((1, 2)), [1], [1, 2, 3], [1], [2, 2, 2])
    with pytest.raises(ValueError, match="no query has a correct match"):
        reid.evaluate(np.zeros((1, 2)), [1], [1, 2], [1], [1, 2])  # only same-camera
    _, mean_ap = reid.evaluate(np.array([[np.inf, 1.0]]), **ok)  # +inf ranks last
    assert mean_ap == pytest.approx(0.5)


def test_euclidean_distances_and_normalisation():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((5, 8)), rng.standard_normal((7, 8))
    expected = np.sqrt(((q[:, None] - g[None]) ** 2).sum(-1))
    distances = reid.euclidean_distances(q, g)
    assert distances.dtype == np.float32 and distances.shape == (5, 7)
    np.testing.assert_allclose(distances, expected, rtol=1e-5)
    qn, gn = reid.l2_normalize(q), reid.l2_normalize(g)
    np.testing.assert_allclose(np.linalg.norm(qn, axis=1), 1, rtol=1e-6)
    # Unit vectors: d^2 = 2 - 2 q.g.
    np.testing.assert_allclose(reid.euclidean_distances(qn, gn) ** 2, 2 - 2 * qn @ gn.T,
                               atol=1e-5)
    assert reid.euclidean_distances(qn, qn).diagonal().max() < 1e-3
    np.testing.assert_array_equal(reid.l2_normalize(np.zeros((1, 3))), 0)  # no NaN


def test_evaluate_features_normalises_then_ranks():
    # Query id 1 cam 1. Gallery directions: g0 (id 1, cam 2) along the query, g1 (id 2)
    # at 90 degrees, g2 (id 1, cam 3) opposite. Lengths must not matter: ranks 1 and 3,
    # AP = (1 + 2/3) / 2 = 5/6.
    query = np.array([[2.0, 0.0]])
    gallery = np.array([[10.0, 0.0], [0.0, 0.1], [-3.0, 0.0]])
    result = reid.evaluate_features(query, gallery, [1], [1, 2, 1], [1], [2, 2, 3])
    assert set(result) == {"mAP", "rank1", "rank5", "rank10"}
    assert all(isinstance(v, float) for v in result.values())
    assert result["mAP"] == pytest.approx(5 / 6)
    assert result["rank1"] == result["rank5"] == result["rank10"] == 1.0


MQ_PIDS, MQ_CAMIDS = [1, 2, 1, 1], [1, 3, 1, 2]
MQ_FEATURES = np.array([[1.0, 0.0], [5.0, 5.0], [3.0, 2.0], [0.0, 4.0]])
QUERY_FEATURES = np.array([[7.0, 7.0], [8.0, 8.0], [9.0, 9.0]])


@pytest.mark.parametrize("pooling, expected", [
    # q0 (id 1, cam 1) pools rows 0 and 2; q1 (id 1, cam 2) has row 3 alone; q2 (id 2,
    # cam 1) has no gt_bbox image under camera 1 (row 1 is camera 3): its own feature.
    ("mean", [[(1 + 3) / 2, (0 + 2) / 2], [0, 4], [9, 9]]),
    ("max", [[3, 2], [0, 4], [9, 9]]),
])
def test_multi_query_pooling(pooling, expected):
    pooled = reid.multi_query_features([1, 1, 2], [1, 2, 1], MQ_FEATURES, MQ_PIDS, MQ_CAMIDS,
                                       pooling=pooling, query_features=QUERY_FEATURES)
    assert pooled.dtype == np.float32
    np.testing.assert_allclose(pooled, expected)


def test_multi_query_without_fallback_or_bad_pooling():
    with pytest.raises(ValueError, match="1 of 3 queries have no gt_bbox image"):
        reid.multi_query_features([1, 1, 2], [1, 2, 1], MQ_FEATURES, MQ_PIDS, MQ_CAMIDS)
    with pytest.raises(ValueError, match="pooling"):
        reid.multi_query_features([1], [1], MQ_FEATURES, MQ_PIDS, MQ_CAMIDS, pooling="sum")
    # Every query found: no fallback needed.
    pooled = reid.multi_query_features([1], [2], MQ_FEATURES, MQ_PIDS, MQ_CAMIDS)
    np.testing.assert_allclose(pooled, [[0, 4]])


def test_multi_query_matches_numpy_on_random_groups():
    rng = np.random.default_rng(1)
    mq_pids, mq_camids = rng.integers(1, 6, 60), rng.integers(1, 4, 60)
    mq = rng.standard_normal((60, 5)).astype(np.float32)
    q_pids, q_camids = rng.integers(1, 7, 20), rng.integers(1, 4, 20)  # id 6: never in mq
    q_features = rng.standard_normal((20, 5)).astype(np.float32)
    for pooling, reduce in (("mean", np.mean), ("max", np.max)):
        pooled = reid.multi_query_features(q_pids, q_camids, mq, mq_pids, mq_camids,
                                           pooling=pooling, query_features=q_features)
        for i in range(20):
            group = (mq_pids == q_pids[i]) & (mq_camids == q_camids[i])
            expected = reduce(mq[group], axis=0) if group.any() else q_features[i]
            np.testing.assert_allclose(pooled[i], expected, rtol=1e-6, atol=1e-6)
