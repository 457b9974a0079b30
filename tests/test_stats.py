"""Statistics on constructed data where the right answer is known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mrilib import stats
from mrilib.stats import bootstrap_median, bootstrap_median_difference

# A hand-checked 3-class confusion matrix (rows true, columns predicted).
#   class 0: tp 5, support 7, predicted 6 -> P 5/6, R 5/7, F1 = 10/13
#   class 1: tp 2, support 4, predicted 3 -> P 2/3, R 1/2, F1 = 4/7
#   class 2: tp 6, support 7, predicted 9 -> P 2/3, R 6/7, F1 = 3/4
HAND = np.array([[5, 1, 1],
                 [0, 2, 2],
                 [1, 0, 6]])


def test_confusion_metrics_match_hand_computation():
    assert stats.accuracy(HAND) == pytest.approx(13 / 18)
    assert stats.class_recall(HAND) == pytest.approx([5 / 7, 1 / 2, 6 / 7])
    assert stats.macro_f1(HAND) == pytest.approx((10 / 13 + 4 / 7 + 3 / 4) / 3)


def test_macro_f1_penalises_a_never_predicted_class_and_skips_an_absent_one():
    never_predicted = np.array([[4, 0], [3, 0]])  # class 1 present, never predicted
    assert stats.macro_f1(never_predicted) == pytest.approx((8 / 11 + 0) / 2)
    absent = np.array([[4, 0, 1], [0, 0, 0], [1, 0, 4]])  # class 1 has no true images
    assert stats.macro_f1(absent) == pytest.approx(0.8)
    assert np.isnan(stats.class_recall(absent)[1])


def test_confusion_metrics_work_on_a_stack():
    stack = np.stack([HAND, np.eye(3, dtype=int) * 4])
    assert stats.macro_f1(stack) == pytest.approx([stats.macro_f1(HAND), 1.0])


@pytest.mark.parametrize("bad", [np.ones((2, 3)), -np.eye(2), np.ones(4)])
def test_bad_confusion_matrices_are_refused(bad):
    with pytest.raises(ValueError, match="confusion matrix"):
        stats.accuracy(bad)


def test_median_interval_holds_the_median_and_is_reproducible():
    x = np.random.default_rng(1).normal(0.2, 0.02, size=20)
    iv = stats.bootstrap_median(x, n_boot=2000, seed=7)
    assert iv.estimate == pytest.approx(np.median(x))
    assert iv.low <= iv.estimate <= iv.high
    assert iv == stats.bootstrap_median(x, n_boot=2000, seed=7)


def test_median_interval_covers_the_true_median_about_95_percent():
    rng = np.random.default_rng(2024)
    trials, true_median = 300, np.log(2)  # median of an Exponential(1)
    hits = 0
    for t in range(trials):
        iv = stats.bootstrap_median(rng.exponential(1.0, 20), n_boot=400, seed=t)
        hits += iv.low <= true_median <= iv.high
    # Percentile intervals for a median of 20 are slightly conservative; 95% +- 3 s.e.
    assert 0.90 <= hits / trials <= 0.99


def test_clustered_data_need_the_hierarchical_interval():
    """Repeats sharing a sample are not independent: the naive interval undercovers."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(5), 4)
    naive_hits = hier_hits = 0
    trials = 200
    for t in range(trials):
        x = rng.normal(0, 1, 5)[groups] + rng.normal(0, 0.2, 20)  # big between-sample spread
        naive = stats.bootstrap_median(x, n_boot=300, seed=t)
        hier = stats.bootstrap_median(x, groups, n_boot=300, seed=t)
        assert hier.high - hier.low > naive.high - naive.low - 1e-12
        naive_hits += naive.low <= 0 <= naive.high
        hier_hits += hier.low <= 0 <= hier.high
    assert naive_hits / trials < 0.75
    assert hier_hits / trials > naive_hits / trials + 0.1


def test_a_shifted_distribution_is_detected_and_an_identical_one_is_not():
    rng = np.random.default_rng(3)
    a = rng.normal(0.20, 0.01, 20)
    shifted = stats.bootstrap_median_difference(a + 0.03, a, n_boot=2000, seed=0)
    assert shifted.excludes_zero() and shifted.estimate == pytest.approx(0.03)
    same = stats.bootstrap_median_difference(a, a.copy(), n_boot=2000, seed=0)
    assert not same.excludes_zero()
    other_draw = stats.bootstrap_median_difference(rng.normal(0.20, 0.01, 20),
                                                   rng.normal(0.20, 0.01, 20), n_boot=2000, seed=0)
    assert not other_draw.excludes_zero()


def test_pairing_finds_a_small_shift_hidden_by_between_sample_spread():
    rng = np.random.default_rng(4)
    sample_effect = rng.normal(0, 0.05, 20)
    a = 0.20 + sample_effect + rng.normal(0, 0.002, 20)
    b = 0.21 + sample_effect + rng.normal(0, 0.002, 20)
    unpaired = stats.bootstrap_median_difference(a, b, n_boot=2000, seed=0)
    paired = stats.bootstrap_median_difference(a, b, paired=True, n_boot=2000, seed=0)
    assert not unpaired.excludes_zero()
    assert paired.excludes_zero() and paired.high < 0


def test_paired_difference_is_the_median_of_pair_differences_not_of_medians():
    # Clustered like the grid (5 samples x 4 repeats), sample effects twice the
    # within-sample noise, the two cells' noise independent: the medians of a and b land
    # on different samples, so only differences taken pair by pair cancel the samples.
    rng = np.random.default_rng(11)
    groups = np.arange(20) % 5
    effect = np.array([-0.2, -0.1, 0.0, 0.1, 0.2])[groups]
    a = 1.0 + effect + rng.normal(0, 0.05, 20) + 0.06
    b = 1.0 + effect + rng.normal(0, 0.05, 20)
    paired = stats.bootstrap_median_difference(a, b, groups, paired=True, n_boot=2000, seed=0)
    assert paired.estimate == pytest.approx(np.median(a - b))
    assert paired.estimate != pytest.approx(np.median(a) - np.median(b))
    assert paired.low > 0  # the shift of 0.06 is found
    unpaired = stats.bootstrap_median_difference(a, b, groups, groups, n_boot=2000, seed=0)
    assert unpaired.low < 0 < unpaired.high  # the sample effects swamp it


def test_two_diverged_runs_differ_by_nothing():
    a = np.array([0.3, np.inf, 0.2, 0.25, np.inf, 0.28])
    b = np.array([0.31, np.inf, 0.22, 0.24, 0.4, 0.3])
    iv = stats.bootstrap_median_difference(a, b, paired=True, n_boot=500, seed=0)
    assert np.isfinite([iv.estimate, iv.low]).all() and iv.high == np.inf
    both = stats.bootstrap_median_difference([np.inf] * 4, [np.inf] * 4, n_boot=200, seed=0)
    assert tuple(both) == (0.0, 0.0, 0.0)
    # each cell diverged on the other's good repeats: +inf and -inf differences, no NaN
    crossed = stats.bootstrap_median_difference([np.inf, 1.0], [1.0, np.inf], paired=True,
                                                n_boot=200, seed=0)
    assert not np.isnan(tuple(crossed)).any() and not crossed.excludes_zero()


def test_compare_cells_does_not_depend_on_which_cell_is_first():
    # 100% real (every repeat its own unit) against a synthetic cell at 100% whose
    # repeats share 5 generators: the pairs are clustered by generator either way.
    runs = _runs(0.0)
    full = runs[runs["real_fraction"] == 1.0]
    synth = full.assign(synthetic="100+20mod", leakage="sample",
                        final_val_loss=full["final_val_loss"] - 0.01)
    both = pd.concat([runs, synth], ignore_index=True)
    a = {"synthetic": "100+20mod", "real_fraction": 1.0}
    b = {"synthetic": "none", "real_fraction": 1.0}
    ab = stats.compare_cells(both, a, b, n_boot=500, seed=0)
    ba = stats.compare_cells(both, b, a, n_boot=500, seed=0)
    assert ab["paired"] and ab["clusters"] == ba["clusters"] == 5
    assert ab["difference"] == pytest.approx(-ba["difference"])
    assert (ab["low"], ab["high"]) == pytest.approx((-ba["high"], -ba["low"]))
    assert ab["estimand"] == "median of paired differences"


def test_paired_medians_are_those_of_the_repeats_compared():
    runs = _runs(-0.04)
    extra = runs[(runs["synthetic"] == "none") & (runs["real_fraction"] == 0.3)].head(1)
    runs = pd.concat([runs, extra.assign(repeat=99, final_val_loss=9.0)], ignore_index=True)
    out = stats.compare_cells(runs, {"synthetic": "fill", "real_fraction": 0.3},
                              {"synthetic": "none", "real_fraction": 0.3}, n_boot=300)
    twin = runs[(runs["synthetic"] == "none") & (runs["real_fraction"] == 0.3)
                & (runs["repeat"] < 99)]
    assert out["n_b"] == 20 and out["median_b"] == pytest.approx(twin["final_val_loss"].median())


@pytest.mark.parametrize("values, match", [([], "no values"), ([0.1, np.nan], "NaN")])
def test_bad_values_are_refused(values, match):
    with pytest.raises(ValueError, match=match):
        stats.bootstrap_median(values)


def _runs(shift: float, n: int = 20, groups: int = 5, seed: int = 0) -> pd.DataFrame:
    """A runs table: real-only and fill cells at 30%, real-only at 100%, paired by repeat."""
    rng = np.random.default_rng(seed)
    sample_effect = rng.normal(0, 0.02, groups)
    rows = []
    for r in range(n):
        g = r % groups
        base = 0.22 + sample_effect[g] + rng.normal(0, 0.003)
        conf = np.diag([170, 10, 600, 420]) + 1
        for synthetic, fraction, loss in (("none", 0.3, base), ("fill", 0.3, base + shift),
                                          ("none", 1.0, 0.176 + rng.normal(0, 0.003))):
            rows.append(dict(model="basic_cnn", aug="none", synthetic=synthetic,
                             real_fraction=fraction,
                             leakage="none" if synthetic == "none" else "sample",
                             repeat=r, sample_index=g, sample_seed=1000 + g, init="scratch",
                             final_val_loss=loss, final_test_confusion=conf.tolist()))
    return pd.DataFrame(rows)


def test_synthetic_effects_detect_a_known_gain_and_not_a_null():
    helped = stats.synthetic_effects(_runs(-0.04), n_boot=1000, seed=0)
    assert len(helped) == 1
    row = helped.iloc[0]
    assert row["paired"] and row["distinguishable"] and row["high"] < 0
    assert row["difference"] == pytest.approx(-0.04, abs=0.005)
    null = stats.synthetic_effects(_runs(0.0), n_boot=1000, seed=0).iloc[0]
    assert not null["distinguishable"]


def test_compare_cells_across_fractions_is_unpaired():
    out = stats.compare_cells(_runs(-0.04), {"synthetic": "fill", "real_fraction": 0.3},
                              {"synthetic": "none", "real_fraction": 1.0}, n_boot=500)
    assert not out["paired"] and out["n_a"] == out["n_b"] == 20


def test_compare_cells_names_a_missing_cell():
    with pytest.raises(ValueError, match="no runs"):
        stats.compare_cells(_runs(0.0), {"synthetic": "fill", "real_fraction": 0.5},
                            {"synthetic": "none", "real_fraction": 0.5})


def test_cell_summary_has_intervals_and_confusion_metrics():
    metrics = ["final_val_loss", "final_test_macro_f1", "final_test_recall_Moderate_Demented"]
    summary = stats.cell_summary(_runs(-0.04), metrics=metrics, n_boot=300)
    assert len(summary) == 3 and (summary["n"] == 20).all()
    # 30% cells: 5 shared real samples; 100% real: every repeat is its own unit
    assert sorted(summary["clusters"]) == [5, 5, 20]
    assert sorted(summary["samples"]) == [1, 5, 5]  # 100% real: one sample, 20 seeds
    one_sample = _runs(-0.04).query("sample_index == 0")  # a cell run one generator at a time
    assert set(stats.cell_summary(one_sample, metrics, n_boot=100)["clusters"]) == {1, 4}
    for metric in metrics:
        assert (summary[f"{metric}_low"] <= summary[metric]).all()
        assert (summary[metric] <= summary[f"{metric}_high"]).all()
    assert summary["final_test_recall_Moderate_Demented"].iloc[0] == pytest.approx(11 / 14)


def test_clusters_apply_only_where_repeats_share_something():
    runs = _runs(0.0)
    ids = stats.cluster_ids(runs)
    full = (runs["real_fraction"] == 1.0).to_numpy()
    assert len(set(ids[full])) == 20
    assert len(set(ids[~full])) == 5


def test_a_diverged_run_counts_as_the_worst_loss_not_a_missing_one():
    runs = _runs(0.0)
    first = runs.index[(runs["synthetic"] == "fill")][0]
    runs.loc[first, "final_val_loss"] = np.nan
    summary = stats.cell_summary(runs, metrics=["final_val_loss"], n_boot=200)
    fill = summary[summary["synthetic"] == "fill"].iloc[0]
    assert fill["diverged"] == 1 and np.isfinite(fill["final_val_loss"])
    kept = stats.metric_values(runs[runs["synthetic"] == "fill"], "final_val_loss")
    assert np.isinf(kept).sum() == 1
    assert fill["final_val_loss"] >= np.median(kept[np.isfinite(kept)])


def test_two_samples_are_too_few_to_call_any_difference():
    runs = _runs(-0.04, n=4, groups=2)
    out = stats.compare_cells(runs, {"synthetic": "fill", "real_fraction": 0.3},
                              {"synthetic": "none", "real_fraction": 0.3}, n_boot=500)
    assert out["paired"] and out["clusters"] == 2
    assert out["high"] < 0 and not out["distinguishable"]


def test_a_class_missing_from_the_split_leaves_its_recall_empty_not_an_error():
    runs = _runs(0.0)
    runs["final_test_confusion"] = [np.diag([170, 0, 600, 420]).tolist()] * len(runs)
    summary = stats.cell_summary(runs, ["final_test_recall_Moderate_Demented",
                                        "final_test_macro_f1"], n_boot=100)
    assert summary["final_test_recall_Moderate_Demented"].isna().all()
    assert summary["final_test_macro_f1"].notna().all()


def test_split_support_counts_true_images_per_class_and_refuses_mixed_splits():
    runs = _runs(0.0, n=4)
    support = stats.split_support(runs)
    assert support["Moderate_Demented"] == 14
    assert support.sum() == 1216  # diagonal 1,200 + 1 in each of the 16 entries
    other = runs.copy()
    other["final_test_confusion"] = [np.eye(4, dtype=int).tolist()] + list(runs[
        "final_test_confusion"][1:])
    with pytest.raises(ValueError, match="different splits"):
        stats.split_support(other)
    with pytest.raises(ValueError, match="no 'final_val_confusion'"):
        stats.split_support(runs, "final_val_confusion")


def test_class_names_come_from_the_first_row_that_has_them():
    runs = _runs(0.0, n=4)
    names = ["a", "b", "c", "d"]
    runs["classes"] = [np.nan] + [names] * (len(runs) - 1)  # e.g. a row of another table
    assert list(stats.split_support(runs).index) == names
    assert "final_test_recall_d" in stats.with_confusion_metrics(runs).columns
    runs["classes"] = [None, np.nan] + [tuple(names)] * (len(runs) - 2)
    assert list(stats.split_support(runs).index) == names


def test_class_names_that_disagree_or_are_missing_are_refused_by_column():
    runs = _runs(0.0, n=4)
    runs["classes"] = [["a", "b", "c", "d"]] + [["d", "c", "b", "a"]] * (len(runs) - 1)
    with pytest.raises(ValueError, match="column 'classes' disagrees"):
        stats.with_confusion_metrics(runs)
    runs["classes"] = np.nan
    with pytest.raises(ValueError, match="column 'classes' has no class list"):
        stats.split_support(runs)
    assert len(stats.with_confusion_metrics(runs, classes=list("abcd")))  # names given: fine


# ----------------------------------------------------------------------------- pairs of units

def test_weighted_median_is_the_median_of_the_repeated_values():
    from mrilib.stats import _weighted_medians

    rng = np.random.default_rng(0)
    values = rng.normal(size=9)
    weights = rng.integers(0, 4, size=(200, 9))
    weights[0] = 0  # nothing drawn: NaN
    got = _weighted_medians(values, weights)
    assert np.isnan(got[0])
    want = [np.median(np.repeat(values, w)) for w in weights[1:]]
    np.testing.assert_allclose(got[1:], want)


def crossed_pairs(seed: int, units: int = 30, pairs: int = 60):
    """Pair values u_i + u_j + noise: pairs sharing a unit share its effect."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=units)
    first, second = np.triu_indices(units, k=1)
    keep = rng.choice(len(first), size=pairs, replace=False)
    first, second = first[keep], second[keep]
    return effect[first] + effect[second] + 0.3 * rng.normal(size=pairs), first, second


def test_pairs_sharing_units_widen_the_interval_and_cover_the_truth():
    from mrilib.stats import bootstrap_median_of_pairs

    # The truth is 0 (units' effects and noise are centred and symmetric). Resampling the
    # pairs as if independent covers it far less often than resampling the units.
    hits = {"units": 0, "pairs": 0}
    widths = {"units": [], "pairs": []}
    for sim in range(60):
        values, first, second = crossed_pairs(sim)
        for how, iv in (("units", bootstrap_median_of_pairs(values, first, second, n_boot=400,
                                                            seed=sim)),
                        ("pairs", bootstrap_median(values, n_boot=400, seed=sim))):
            hits[how] += iv.low <= 0 <= iv.high
            widths[how].append(iv.high - iv.low)
    assert np.median(widths["units"]) > 1.4 * np.median(widths["pairs"])
    assert hits["units"] >= 0.85 * 60 and hits["pairs"] <= 0.8 * 60


def test_difference_against_pairs_resamples_their_units():
    from mrilib.stats import bootstrap_median_of_pairs

    values, first, second = crossed_pairs(1)
    other = np.random.default_rng(5).normal(size=40) + 1.0
    by_units = bootstrap_median_difference(other, values, n_boot=500, seed=3,
                                           pairs_b=(first, second))
    naive = bootstrap_median_difference(other, values, n_boot=500, seed=3)
    assert by_units.estimate == pytest.approx(np.median(other) - np.median(values))
    assert by_units.high - by_units.low > naive.high - naive.low
    with pytest.raises(ValueError, match="pairs_b: 3 and 60 unit ids for 60 values of b"):
        bootstrap_median_difference(other, values, pairs_b=(first[:3], second))
    with pytest.raises(ValueError, match="2 and 60 unit ids for 60 values"):
        bootstrap_median_of_pairs(values, first[:2], second)


def shared_scans(seed: int, scans: int = 30, per_scan: int = 2, pairs: int = 60):
    """Variations of each scan and pairs of scans, both carrying their scans' effects."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=scans)
    source = np.repeat(np.arange(scans), per_scan)
    a = effect[source] + 0.2 * rng.normal(size=source.size)
    first, second = np.triu_indices(scans, k=1)
    keep = rng.choice(len(first), size=pairs, replace=False)
    first, second = first[keep], second[keep]
    b = (effect[first] + effect[second]) / 2 + 0.2 * rng.normal(size=pairs)
    return a, source, b, first, second


def test_sides_that_share_scans_are_resampled_together():
    # Both medians move with the sample of scans, so their difference moves less than
    # either: one draw of the scans for both sides gives a narrower interval than
    # drawing them apart (the same pairs under other names), and still covers the truth (0).
    joint, apart, hits = [], [], 0
    for sim in range(40):
        a, source, b, first, second = shared_scans(sim)
        iv = bootstrap_median_difference(a, b, source, n_boot=400, seed=sim,
                                         pairs_b=(first, second))
        far = bootstrap_median_difference(a, b, source, n_boot=400, seed=sim,
                                          pairs_b=(first + 1000, second + 1000))
        joint.append(iv.high - iv.low)
        apart.append(far.high - far.low)
        hits += iv.low <= 0 <= iv.high
    assert np.median(joint) < 0.8 * np.median(apart)
    assert hits >= 0.85 * 40


def test_pairs_b_refuses_what_it_would_ignore():
    a, source, b, first, second = shared_scans(0)
    with pytest.raises(ValueError, match="drop paired=True or pairs_b"):
        bootstrap_median_difference(a[:60], b, paired=True, pairs_b=(first, second))
    with pytest.raises(ValueError, match="drop groups_b"):
        bootstrap_median_difference(a, b, source, groups_b=first, pairs_b=(first, second))
    with pytest.raises(ValueError, match="values of pairs must be finite; 1 are not"):
        bootstrap_median_difference(a, np.r_[b[:-1], np.inf], source, pairs_b=(first, second))
