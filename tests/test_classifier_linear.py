"""The linear head (`HeadConfig(kind="linear")`, what a retrain trains for the default
ordering) on plain numpy arrays."""

import json

import numpy as np
import pytest

from model.classifier import (
    ACCURACY_C_GRID,
    C_GRID,
    FALLBACK_C,
    SHARPENING,
    TEMPERATURES,
    ClassifierHead,
    HeadConfig,
    MultiLabelHead,
    _c_and_temperature_by_log_loss,
    positive_weights,
)
from model.heads import ControlHeads, ControlSpec, fresh_copy, train_heads


def _blobs(n, dim=16, classes=3, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = np.arange(n) % classes
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def _head(labels, dim, **settings):
    return ClassifierHead(HeadConfig(labels=list(labels), input_dim=dim, **{"kind": "linear", **settings}))


def test_linear_head_fits_separable_data():
    x, y = _blobs(90)
    head = _head("abc", x.shape[1]).fit(x, y)
    assert (head.predict(head.predict_proba(x)) == y).all()
    # The default rule: C from ACCURACY_C_GRID, its logits only ever sharpened.
    assert head.config.c_objective == "sharpened_log_loss"
    assert head.C_ in ACCURACY_C_GRID and head.temperature_ in SHARPENING
    p = head.predict_proba(x)
    assert np.allclose(p.sum(axis=1), 1, atol=1e-5)
    # No hidden layer: the "last hidden layer" the ATL orderings read is the input itself.
    assert np.allclose(head.hidden(x), x)


def test_binary_matches_scikit_learn_probabilities():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(60, classes=2, spread=2.0)
    head = _head(["neg", "pos"], x.shape[1], C=3.0).fit(x, y)
    reference = LogisticRegression(C=3.0, class_weight="balanced", max_iter=1000).fit(x.astype(np.float64), y)
    assert np.allclose(head.predict_proba(x), reference.predict_proba(x.astype(np.float64)), atol=1e-4)
    assert head.C_ == 3.0


def test_regularisation_is_chosen_out_of_fold():
    # Noisy labels: a weak penalty overfits them; the out-of-fold choice must see that and
    # prefer a stronger one than on clean, separable data.
    rng = np.random.default_rng(1)
    x_clean, y_clean = _blobs(200, dim=40, classes=2, spread=0.05)
    clean = _head("ab", 40, c_objective="log_loss").fit(x_clean, y_clean)
    x_noise = rng.normal(size=(200, 40)).astype(np.float32)
    y_noise = rng.integers(0, 2, 200)
    noisy = _head("ab", 40, c_objective="log_loss").fit(x_noise, y_noise)
    assert noisy.C_ < clean.C_
    assert noisy.C_ <= 1.0  # pure noise: the strongest penalties win on held-out log loss


def test_fold_copies_keep_the_chosen_C_and_unseen_classes_get_no_probability():
    x, y = _blobs(60)
    head = _head("abcd", x.shape[1]).fit(x, y)  # "d" never labeled
    assert head.predict_proba(x)[:, 3].max() < 1e-6
    copy = fresh_copy(head)
    assert copy.config.C == head.C_ and copy.C_ is None
    # A class with a single example: by log loss no out-of-fold choice is made, the fallback
    # C is used; the default still searches on the other classes' folds.
    y_one = y.copy()
    y_one[0] = 3
    assert _head("abcd", x.shape[1], c_objective="log_loss").fit(x, y_one).C_ == FALLBACK_C
    assert _head("abcd", x.shape[1]).fit(x, y_one).C_ in ACCURACY_C_GRID
    # One class only: a constant prediction of it.
    single = _head("abc", x.shape[1]).fit(x[:5], np.zeros(5, dtype=int))
    assert (single.predict(single.predict_proba(x)) == 0).all()


def _rare_overlapping(n=400, share=0.1, seed=2):
    """Two classes that overlap, the second rare: weighting it shifts the boundary into the
    common class, which the labels' own mix (and so the out-of-fold log loss) penalises."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < share).astype(np.int64)
    x = rng.normal(size=(n, 8))
    x[:, 0] += 1.5 * y
    return x.astype(np.float32), y


def test_class_weighting_is_chosen_out_of_fold_with_C():
    from sklearn.linear_model import LogisticRegression

    x, y = _rare_overlapping()
    head = _head("ab", x.shape[1], class_weight="auto").fit(x, y)
    assert head.class_weight_ is None  # unweighted: the lower out-of-fold log loss here
    reference = LogisticRegression(C=head.C_, max_iter=1000).fit(x.astype(np.float64), y)
    # (LogisticRegressionCV refits from the folds' solution: equal within the solver's tolerance)
    assert np.allclose(head.predict_proba(x)[:, 1], reference.predict_proba(x.astype(np.float64))[:, 1], atol=2e-3)
    balanced = _head("ab", x.shape[1]).fit(x, y)  # the default
    assert balanced.config.class_weight == "balanced" and balanced.class_weight_ == "balanced"
    # Balancing moves the boundary into the common class: more tasks predicted rare.
    assert head.predict(head.predict_proba(x)).mean() < balanced.predict(balanced.predict_proba(x)).mean()
    # Classes of equal size: both weightings are the same fit, and the tie goes to balanced.
    x_even, y_even = _blobs(90, classes=3, spread=1.5)
    assert _head("abc", x_even.shape[1], class_weight="auto").fit(x_even, y_even).class_weight_ == "balanced"
    # Forced unweighted, and a given C (no out-of-fold pass): no choice is made.
    assert _head("ab", x.shape[1], class_weight=None).fit(x, y).class_weight_ is None
    assert _head("ab", x.shape[1], C=3.0, class_weight="auto").fit(x, y).class_weight_ == "balanced"
    with pytest.raises(ValueError, match="unknown class weighting"):
        _head("ab", 4, class_weight="inverse")


def test_fold_copies_and_saved_heads_keep_the_chosen_class_weighting(tmp_path):
    x, y = _rare_overlapping()
    head = _head("ab", x.shape[1], class_weight="auto").fit(x, y)
    assert head.class_weight_ is None
    copy = fresh_copy(head)
    assert copy.config.class_weight is None and copy.config.C == head.C_
    head.save(tmp_path)
    assert json.loads((tmp_path / "classifier.json").read_text())["extra"]["chosen_class_weight"] is None
    loaded = ClassifierHead.load(tmp_path)
    assert loaded.class_weight_ is None and loaded.C_ == head.C_ and loaded.config.class_weight == "auto"
    assert np.array_equal(loaded.predict_proba(x), head.predict_proba(x))
    assert fresh_copy(loaded).config.class_weight is None
    # An unfitted head has chosen nothing: its copy still chooses.
    assert fresh_copy(_head("ab", x.shape[1], class_weight="auto")).config.class_weight == "auto"


def test_save_load_round_trip_gives_identical_probabilities(tmp_path):
    x, y = _blobs(60)
    specs = [ControlSpec(name="topic", labels=list("abc"), inputs=["text"]),
             ControlSpec(name="tags", labels=list("wxyz"), multi_label=True, inputs=["text"])]
    tags = np.zeros((60, 4), dtype=np.int8)
    tags[np.arange(60), y] = 1
    tags[::4, 3] = 1
    heads, _ = train_heads(specs, [x, x], [y, tags], labeled=np.arange(60), kind="linear")
    heads.save(tmp_path)
    saved = json.loads((tmp_path / "heads.json").read_text())["heads"]
    assert [entry["head"]["kind"] for entry in saved] == ["linear", "linear"]
    loaded = ControlHeads.load(tmp_path)
    for before, after in zip(heads.predict_proba([x, x]), loaded.predict_proba([x, x])):
        assert np.array_equal(before, after)
    assert np.array_equal(loaded.heads[1].thresholds_, heads.heads[1].thresholds_)


def test_multi_label_linear_head_learns_each_choice():
    x, y = _blobs(120, classes=3, spread=0.2)
    targets = np.zeros((120, 4), dtype=np.float32)
    targets[np.arange(120), y] = 1
    targets[y == 0, 2] = 1  # choice 2 also goes with class 0
    head = MultiLabelHead(HeadConfig(labels=list("wxyz"), input_dim=x.shape[1], kind="linear")).fit(x, targets)
    chosen = head.predict(head.predict_proba(x))
    assert (chosen[:, :3] == targets[:, :3].astype(bool)).mean() > 0.97
    # "z" is never chosen: a constant, low probability.
    assert head.predict_proba(x)[:, 3].max() < 0.01
    assert len(head.choice_C_) == 4
    copy = fresh_copy(head)
    assert copy.config.extra["choice_C"] == head.choice_C_
    # Saved and loaded, the head keeps what its fit chose (its C and each choice's), so a fresh
    # copy of the loaded head does not search again.
    loaded = MultiLabelHead.from_config_dict(json.loads(json.dumps(head.config_dict())))
    assert loaded.C_ == head.C_ and loaded.choice_C_ == head.choice_C_
    assert np.array_equal(loaded.thresholds_, head.thresholds_)
    assert fresh_copy(loaded).config.extra["choice_C"] == head.choice_C_


def test_versions_saved_before_kind_load_as_the_mlp(tmp_path):
    x, y = _blobs(30)
    old = _head("abc", x.shape[1], kind="mlp", epochs=20).fit(x, y)
    old.save(tmp_path)
    config = json.loads((tmp_path / "classifier.json").read_text())
    config.pop("kind")
    config.pop("C")
    (tmp_path / "classifier.json").write_text(json.dumps(config))
    loaded = ClassifierHead.load(tmp_path)
    assert loaded.config.kind == "mlp"
    assert np.array_equal(loaded.predict_proba(x), old.predict_proba(x))
    assert loaded.hidden(x).shape == (30, old.config.hidden_dim)


def test_versions_saved_before_the_sharpened_default_keep_choosing_C_by_log_loss(tmp_path):
    """A linear head saved without `c_objective` (before it existed) chose C by log loss: its
    fold copies, which refit on the labels, must go on doing so."""
    x, y = _blobs(60)
    head = _head("abc", x.shape[1], c_objective="log_loss").fit(x, y)
    head.save(tmp_path)
    config = json.loads((tmp_path / "classifier.json").read_text())
    config.pop("c_objective")
    (tmp_path / "classifier.json").write_text(json.dumps(config))
    loaded = ClassifierHead.load(tmp_path)
    assert loaded.config.c_objective == "log_loss" and loaded.temperature_ is None
    assert np.array_equal(loaded.predict_proba(x), head.predict_proba(x))
    assert HeadConfig(labels=["a"], input_dim=1).c_objective == "sharpened_log_loss"  # new heads


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown head kind"):
        _head("ab", 4, kind="forest")



def test_c_by_accuracy_takes_the_most_accurate_C_and_calibrates_its_probabilities_out_of_fold(tmp_path):
    """`c_objective="accuracy"`: the C of ACCURACY_C_GRID whose stratified out-of-fold accuracy
    (the head's folds) is highest, an accuracy tie going to the lower log loss; then the
    logits scaled by the temperature whose out-of-fold probabilities have the lowest log
    loss. Recomputed here fold by fold with plain scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    x, y = _blobs(90, dim=24, classes=3, spread=1.6, seed=3)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)  # unit length, as sentence vectors
    head = _head("abc", x.shape[1], c_objective="accuracy", seed=7).fit(x, y)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=7).split(x, y))

    def out_of_fold(C):
        p = np.zeros((len(y), 3))
        for train, test in folds:
            p[test] = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(
                x[train], y[train]).predict_proba(x[test])
        return p

    scores = {}
    for C in ACCURACY_C_GRID:
        accuracy, loss = [], []
        for train, test in folds:
            p = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(
                x[train], y[train]).predict_proba(x[test])
            accuracy.append(np.mean(p.argmax(axis=1) == y[test]))
            loss.append(log_loss(y[test], p, labels=[0, 1, 2]))
        scores[C] = (np.mean(accuracy), -np.mean(loss))
    best = max(scores.values())[0]
    tied = [C for C in ACCURACY_C_GRID if abs(scores[C][0] - best) < 1e-9]
    chosen = max(tied, key=lambda C: scores[C][1])
    assert head.C_ == chosen
    by_log_loss = _head("abc", x.shape[1], c_objective="log_loss", seed=7).fit(x, y)
    assert by_log_loss.C_ == max(C_GRID, key=lambda C: scores[C][1]) != chosen
    assert by_log_loss.temperature_ is None

    # The temperature: lowest out-of-fold log loss of p ** t, renormalised.
    p = out_of_fold(chosen)
    losses = [log_loss(y, (p ** t) / (p ** t).sum(axis=1, keepdims=True), labels=[0, 1, 2]) for t in TEMPERATURES]
    assert head.temperature_ == pytest.approx(TEMPERATURES[int(np.argmin(losses))])
    assert head.temperature_ != 1.0
    unscaled = LogisticRegression(C=chosen, class_weight="balanced", max_iter=1000).fit(x, y)
    logits = unscaled.decision_function(x) * head.temperature_
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    # (the head refits inside LogisticRegressionCV: equal to solver tolerance)
    assert np.allclose(head.predict_proba(x), expected / expected.sum(axis=1, keepdims=True), atol=5e-3)

    # Fold copies and saved heads keep C and the temperature: no second search.
    copy = fresh_copy(head)
    assert copy.config.C == chosen and copy.config.extra["temperature"] == head.temperature_
    copy.fit(x, y)
    assert np.allclose(copy.predict_proba(x), head.predict_proba(x), atol=5e-3)
    head.save(tmp_path)
    loaded = ClassifierHead.load(tmp_path)
    assert loaded.temperature_ == head.temperature_ and loaded.C_ == head.C_
    assert np.array_equal(loaded.predict_proba(x), head.predict_proba(x))
    with pytest.raises(ValueError, match="unknown C objective"):
        _head("abc", 4, c_objective="f1")


def test_c_by_accuracy_still_searches_when_a_class_has_one_label():
    x, y = _blobs(61, dim=16, classes=3, spread=0.8, seed=5)
    y = y.copy()
    y[y == 2] = 0
    y[0] = 2  # one label of class 2
    by_log_loss = _head("abc", 16, c_objective="log_loss").fit(x, y)
    assert by_log_loss.C_ == FALLBACK_C and by_log_loss.temperature_ is None
    by_accuracy = _head("abc", 16, c_objective="accuracy").fit(x, y)
    assert by_accuracy.C_ in ACCURACY_C_GRID and by_accuracy.temperature_ in TEMPERATURES
    assert by_accuracy.predict_proba(x).shape == (61, 3)


def test_multi_label_c_by_accuracy_keeps_each_choices_temperature_in_copies(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 12))
    targets = (x[:, :3] + 0.8 * rng.normal(size=(120, 3)) > 0.3).astype(np.float32)
    head = MultiLabelHead(HeadConfig(labels=["a", "b", "c"], input_dim=12, kind="linear",
                                     c_objective="accuracy")).fit(x, targets)
    assert len(head.choice_temperature_) == 3 and all(t in TEMPERATURES for t in head.choice_temperature_)
    copy = fresh_copy(head)
    assert copy.config.extra["choice_temperature"] == head.choice_temperature_
    assert np.allclose(copy.fit(x, targets).predict_proba(x), head.predict_proba(x), atol=5e-3)
    head.save(tmp_path)
    assert MultiLabelHead.load(tmp_path).choice_temperature_ == head.choice_temperature_


def _best_scaled_pair(x, y, temperatures, seed):
    """(mean log loss, C, temperature): the pair of ACCURACY_C_GRID x `temperatures` whose
    scaled out-of-fold probabilities (the head's folds: stratified, 5, `seed`) have the
    lowest mean log loss, fold by fold with plain scikit-learn."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y))
    classes = len(np.unique(y))
    best = (np.inf, None, None, None)
    for C in ACCURACY_C_GRID:
        p = np.zeros((len(y), classes))
        for train, test in folds:
            p[test] = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(
                x[train], y[train]).predict_proba(x[test])
        for t in temperatures:
            q = p ** t / (p ** t).sum(axis=1, keepdims=True)
            each = -np.log(q[np.arange(len(y)), y])
            if each.mean() < best[0] - 1e-9:
                best = (each.mean(), C, t, each)
    return best


@pytest.mark.parametrize("objective, temperatures", [("scaled_log_loss", TEMPERATURES),
                                                     ("sharpened_log_loss", SHARPENING)])
def test_scaled_log_loss_chooses_C_and_temperature_together_out_of_fold(tmp_path, objective, temperatures):
    """`c_objective="scaled_log_loss"`: the (C, temperature) of ACCURACY_C_GRID x
    TEMPERATURES whose scaled out-of-fold probabilities (the head's folds) have the lowest
    mean log loss; the head is the logistic regression at that C, its logits scaled.
    "sharpened_log_loss": the same over the temperatures of at least 1 (SHARPENING).
    Recomputed here fold by fold with plain scikit-learn."""
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(90, dim=24, classes=3, spread=1.6, seed=3)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    head = _head("abc", x.shape[1], c_objective=objective, seed=7).fit(x, y)
    best = _best_scaled_pair(x, y, temperatures, seed=7)
    assert head.C_ == best[1]
    assert head.temperature_ == pytest.approx(best[2])
    unscaled = LogisticRegression(C=best[1], class_weight="balanced", max_iter=1000).fit(x, y)
    logits = unscaled.decision_function(x) * best[2]
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(head.predict_proba(x), expected / expected.sum(axis=1, keepdims=True), atol=5e-3)
    # The search itself, asked for each label's loss at the pair (bench/weighting_probe.py):
    # the same pair, and the losses whose mean it minimised.
    from sklearn.model_selection import StratifiedKFold

    C, t, loss, each = _c_and_temperature_by_log_loss(
        x, y.astype(np.int64), "balanced", StratifiedKFold(5, shuffle=True, random_state=7), ACCURACY_C_GRID,
        temperatures=temperatures, per_label=True)
    assert (C, t) == (best[1], pytest.approx(best[2]))
    assert loss == pytest.approx(best[0], abs=1e-3) and loss == pytest.approx(each.mean())
    assert np.allclose(each, best[3], atol=5e-3)
    copy = fresh_copy(head)  # a fold copy: no second search
    assert copy.config.C == head.C_ and copy.config.extra["temperature"] == head.temperature_
    head.save(tmp_path)
    loaded = ClassifierHead.load(tmp_path)
    assert np.array_equal(loaded.predict_proba(x), head.predict_proba(x))
    # A class with one label: still searched, that label left out of the loss.
    y1 = y.copy()
    y1[y1 == 2] = 0
    y1[0] = 2
    single = _head("abc", x.shape[1], c_objective=objective).fit(x, y1)
    assert single.C_ in ACCURACY_C_GRID and single.temperature_ in temperatures


def test_sharpened_log_loss_never_softens_a_weak_penalty_on_boundary_labels():
    """Labels bunched at the class boundary, one in ten flipped (what an uncertainty ordering
    buys): the scaled rule picks an almost unpenalised C with its logits softened (a
    temperature below 1); the sharpened rule may not soften, and takes its own best pair
    over SHARPENING instead (recomputed with plain scikit-learn)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    w /= np.linalg.norm(w)
    x = rng.normal(size=(90, 8))
    x -= np.outer(0.9 * (x @ w), w)  # pulled towards the boundary x @ w = 0
    y = (x @ w > 0).astype(np.int64)
    flipped = rng.random(90) < 0.1
    y[flipped] = 1 - y[flipped]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scaled = _head("ab", 8, c_objective="scaled_log_loss", seed=7).fit(x, y)
    sharpened = _head("ab", 8, c_objective="sharpened_log_loss", seed=7).fit(x, y)
    assert scaled.temperature_ < 1.0
    assert sharpened.temperature_ >= 1.0
    _, C, t, _ = _best_scaled_pair(x, y, SHARPENING, seed=7)
    assert (sharpened.C_, sharpened.temperature_) == (C, pytest.approx(t))
    assert (sharpened.C_, sharpened.temperature_) != (scaled.C_, scaled.temperature_)


def test_multi_label_choices_are_weighted_as_asked_and_old_versions_stay_weighted():
    """The multi-label linear head's choices: scikit-learn's unweighted logistic regression
    with `choice_weight=None`, its positives weighted against its negatives with "balanced"
    ("auto", the default, chooses between the two: the next test); settings saved before the
    field existed load as "balanced"."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(8)
    x = rng.normal(size=(150, 10))
    targets = np.column_stack([x[:, 0] + 0.7 * rng.normal(size=150) > 1.0,  # a rare choice (~20 %)
                               x[:, 1] + 0.7 * rng.normal(size=150) > 0.0]).astype(np.float32)
    config = dict(labels=["rare", "even"], input_dim=10, kind="linear", C=1.0)
    for weighting, class_weight in ((None, lambda t: None),
                                    ("balanced", lambda t: {0: 1.0, 1: float(positive_weights(targets)[t])})):
        head = MultiLabelHead(HeadConfig(**config, choice_weight=weighting)).fit(x, targets)
        for j in range(2):
            expected = LogisticRegression(C=1.0, class_weight=class_weight(j), max_iter=1000).fit(
                x, targets[:, j]).predict_proba(x)[:, 1]
            assert np.allclose(head.predict_proba(x)[:, j], expected, atol=1e-3), (weighting, j)
    assert HeadConfig(labels=["a"], input_dim=1).choice_weight == "auto"
    weighted = MultiLabelHead(HeadConfig(**config, choice_weight="balanced")).fit(x, targets)
    unweighted = MultiLabelHead(HeadConfig(**config, choice_weight=None)).fit(x, targets)
    # Weighting the rare choice's positives up raises its probabilities.
    assert weighted.predict_proba(x)[:, 0].mean() > unweighted.predict_proba(x)[:, 0].mean() + 0.05
    saved = unweighted.config_dict()
    del saved["choice_weight"]
    assert MultiLabelHead.from_config_dict(saved).config.choice_weight == "balanced"
    assert fresh_copy(MultiLabelHead.from_config_dict(unweighted.config_dict())).config.choice_weight is None
    with pytest.raises(ValueError, match="unknown choice weighting"):
        MultiLabelHead(HeadConfig(**config, choice_weight="unweighted"))


def test_multi_label_auto_weighting_is_chosen_per_choice_out_of_fold_and_kept_in_copies():
    """`choice_weight="auto"`: per choice, weighted or unweighted, whichever has the lower
    out-of-fold log loss with its own C (the single-choice head's `_logistic_regression` on
    the same folds); weighted where a choice has fewer than two of a side. Fold copies and
    saved heads keep each choice's weighting."""
    from model.classifier import _logistic_regression

    rng = np.random.default_rng(9)
    x = rng.normal(size=(160, 10))
    targets = np.column_stack([x[:, 0] + 0.7 * rng.normal(size=160) > 1.2,
                               x[:, 1] + 0.7 * rng.normal(size=160) > 0.0,
                               np.arange(160) == 3]).astype(np.float32)  # one positive only
    head = MultiLabelHead(HeadConfig(labels=["rare", "even", "once"], input_dim=10, kind="linear",
                                     c_objective="log_loss", choice_weight="auto")).fit(x, targets)
    for j in range(2):
        truth = targets[:, j].astype(np.int64)
        rarer = int(min(truth.sum(), len(truth) - truth.sum()))
        losses = {w: _logistic_regression(x, truth, {0: 1.0, 1: float(positive_weights(targets)[j])}
                                          if w == "balanced" else None, None, 0, rarer)[2]
                  for w in ("balanced", None)}
        expected = "balanced" if losses["balanced"] <= losses[None] + 1e-12 else None
        assert head.choice_weight_[j] == expected, (j, losses)
    assert head.choice_weight_[2] == "balanced"  # one positive: no out-of-fold choice
    copy = fresh_copy(head)
    assert copy.config.extra["choice_weights"] == head.choice_weight_
    assert np.allclose(copy.fit(x, targets).predict_proba(x), head.predict_proba(x), atol=1e-3)
    loaded = MultiLabelHead.from_config_dict(json.loads(json.dumps(head.config_dict())))
    assert loaded.choice_weight_ == head.choice_weight_


def test_pool_importance_weights_the_labels_like_the_unlabeled_tasks_most():
    """`pool_importance`: the labels' density ratio pool / labeled, cross-fitted, mean 1."""
    from model.classifier import IMPORTANCE_CLIP, pool_importance

    rng = np.random.default_rng(4)
    labeled = rng.normal(size=(300, 8))
    shift = np.zeros(8)
    shift[0] = 1.5
    pool = rng.normal(size=(2500, 8)) + shift  # the unlabeled tasks sit further along axis 0
    w = pool_importance(labeled, pool, seed=1)
    assert w.shape == (300,) and np.isclose(w.mean(), 1.0)
    # For two unit Gaussians the true log ratio is linear in x0: the estimate must follow it.
    assert np.corrcoef(np.log(w), labeled[:, 0])[0, 1] > 0.9
    assert w.max() / w.min() <= IMPORTANCE_CLIP[1] / IMPORTANCE_CLIP[0] + 1e-9
    # The same distribution on both sides: no label counts much more than another.
    same = pool_importance(labeled, rng.normal(size=(2500, 8)), seed=1)
    assert np.percentile(same, 95) / np.percentile(same, 5) < 3
    assert np.array_equal(pool_importance(labeled, pool[:2]), np.ones(300))  # too few unlabeled tasks


def _labels_and_a_shifted_pool():
    """Three noisy classes in 12 dimensions, and 400 unlabeled tasks near them, moved along axis 0."""
    x, y = _blobs(150, dim=12, classes=3, spread=1.0, seed=5)
    x = x.astype(np.float64)
    rng = np.random.default_rng(6)
    pool = x[rng.choice(150, 400)] + 0.8 * rng.normal(size=(400, 12))
    pool[:, 0] += 1.0
    return x, y, pool


def test_pool_weighting_chooses_C_by_importance_weighted_out_of_fold_log_loss():
    """`c_weighting="pool"`: the C of C_GRID with the lowest out-of-fold log loss weighted
    by `pool_importance` (the head's folds), recomputed fold by fold with plain
    scikit-learn; without unlabeled tasks the head is the default one. `ControlHeads.fit`
    hands every task that does not answer the control over as the pool."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from model.classifier import pool_importance

    x, y, pool = _labels_and_a_shifted_pool()
    head = _head("abc", 12, c_weighting="pool", c_objective="log_loss", seed=7).fit(x, y, pool=pool)
    w = pool_importance(x, pool, seed=7)
    assert np.allclose(head.importance_, w)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=7).split(x, y))
    losses = []
    for C in C_GRID:
        p = np.zeros((len(y), 3))
        for train, test in folds:
            p[test] = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(
                x[train], y[train]).predict_proba(x[test])
        losses.append(np.average(-np.log(p[np.arange(len(y)), y]), weights=w))
    assert head.C_ == C_GRID[int(np.argmin(losses))], losses
    # Here the weights change the choice.
    assert head.C_ != _head("abc", 12, c_objective="log_loss", seed=7).fit(x, y).C_
    reference = LogisticRegression(C=head.C_, class_weight="balanced", max_iter=1000).fit(x, y)
    assert np.allclose(head.predict_proba(x), reference.predict_proba(x), atol=2e-3)
    # No pool given: uniform scores, the default head's C.
    plain = _head("abc", 12, c_weighting="pool", c_objective="log_loss", seed=7).fit(x, y)
    assert plain.importance_ is None and plain.C_ == _head("abc", 12, c_objective="log_loss", seed=7).fit(x, y).C_
    # Through ControlHeads: the unanswered rows are the pool, for single- and multi-label heads.
    specs = [ControlSpec(name="one", labels=list("abc")),
             ControlSpec(name="many", labels=["p", "q"], multi_label=True)]
    features = np.vstack([x, pool])
    single = np.r_[y, np.full(len(pool), -1)]
    multi = np.vstack([np.column_stack([y == 0, x[:, 1] > 0]).astype(np.int64), np.full((len(pool), 2), -1)])
    heads = ControlHeads.build(specs, [12, 12], kind="linear", c_weighting="pool", c_objective="log_loss", seed=7)
    heads.fit([features, features], [single, multi])
    for trained in heads.heads:
        assert np.allclose(trained.importance_, w)
    assert heads.heads[0].C_ == head.C_


def test_pool_fit_weights_the_fit_too_and_balances_the_weighted_class_counts():
    """`c_weighting="pool_fit"`: the chosen C's final fit is scikit-learn's with the
    importance weights as sample weights and classes balanced over the weighted counts."""
    from sklearn.linear_model import LogisticRegression

    from model.classifier import pool_importance

    x, y, pool = _labels_and_a_shifted_pool()
    head = _head("abc", 12, c_weighting="pool_fit", c_objective="log_loss", seed=7).fit(x, y, pool=pool)
    w = pool_importance(x, pool, seed=7)
    mass = np.bincount(y, weights=w)
    reference = LogisticRegression(C=head.C_, class_weight={c: mass.sum() / (3 * mass[c]) for c in range(3)},
                                   max_iter=1000).fit(x, y, sample_weight=w)
    assert np.allclose(head.predict_proba(x), reference.predict_proba(x), atol=2e-3)
    unweighted = LogisticRegression(C=head.C_, class_weight="balanced", max_iter=1000).fit(x, y)
    assert not np.allclose(head.predict_proba(x), unweighted.predict_proba(x), atol=2e-3)


def test_pool_weighting_is_refused_with_the_accuracy_objective_and_unknown_names():
    with pytest.raises(ValueError, match="log loss"):
        _head("ab", 4, c_weighting="pool", c_objective="accuracy")
    with pytest.raises(ValueError, match="log loss"):
        _head("ab", 4, c_weighting="pool_fit", c_objective="accuracy")
    with pytest.raises(ValueError, match="unknown C weighting"):
        _head("ab", 4, c_weighting="labels")


def test_balanced_within_balances_each_source_as_scikit_learn_balances_a_whole_set():
    """`bench/weighting_probe.py --per-source`: the weights of each group are scikit-learn's
    "balanced" sample weights computed on that group alone (plain numpy labels)."""
    from sklearn.utils.class_weight import compute_sample_weight

    from bench.weighting_probe import balanced_within

    y = np.array([0] * 80 + [1] * 20 + [0] * 10 + [1] * 30)  # a skewed free set, then a pool set
    groups = np.r_[np.zeros(100), np.ones(40)].astype(int)
    weights = balanced_within(y, groups)
    for g in (0, 1):
        member = groups == g
        assert np.allclose(weights[member], compute_sample_weight("balanced", y[member]))
        # each class carries the same total weight within its group
        totals = [weights[member & (y == c)].sum() for c in (0, 1)]
        assert totals[0] == pytest.approx(totals[1])
    assert not np.allclose(weights, compute_sample_weight("balanced", y))  # not the global weights
