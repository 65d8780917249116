"""The simulator end to end on real data (airline tweets, movie snippets), small and fast.

One run goes through the command line exactly as a user types it (CSV data, a process pool
of two, every registered ordering); a second one replays a domain shift from files in the
other two input formats (JSONL seed data, a Label Studio export as the test set).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.datasets import airline_tweets, load_labeled_file, movie_snippets
from model.orderings import ORDERINGS
from model.orderings.base import OrderingResult
from model.simulate import (
    SimulationConfig,
    _exact_batch,
    aggregate,
    aggregate_diagnostics,
    aulc,
    batch_overlap,
    code_hash,
    main,
    plot_curves,
    previous_invocations,
    write_invocations,
)

REPO = Path(__file__).resolve().parents[1]
POOL, TEST, INITIAL, BATCH, BUDGET = 120, 150, 20, 20, 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Small labeled files cut from the offline corpora, and one encoding cache for both runs."""
    root = tmp_path_factory.mktemp("simulate")
    tweets = airline_tweets().sample(400, seed=1)
    with open(root / "tweets.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(tweets.texts, tweets.labels))
    movies = movie_snippets().sample(120, seed=1)
    (root / "movies.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in zip(movies.texts, movies.labels)))
    # A Label Studio export: the test set of the domain-shift run, drawn from the tweets file
    # itself (the first 100), as a user exporting a separately labeled test project would.
    export = [
        {"id": i, "data": {"text": t},
         "annotations": [{"id": i, "result": [{"type": "choices", "from_name": "sentiment", "to_name": "text",
                                                "value": {"choices": [label]}}]}]}
        for i, (t, label) in enumerate(zip(tweets.texts[:100], tweets.labels[:100]))
    ]
    (root / "test_export.json").write_text(json.dumps(export))
    return root


def in_domain_args(workdir, out) -> list[str]:
    return ["--data", str(workdir / "tweets.csv"), "--out", str(out), "--seeds", "2", "--pool-size", str(POOL),
            "--test-size", str(TEST), "--initial", str(INITIAL), "--batch-size", str(BATCH),
            "--budget", str(BUDGET), "--cache", str(workdir / "enc.sqlite3")]


@pytest.fixture(scope="module")
def in_domain(workdir):
    """`python -m model.simulate` on a CSV: every ordering, 2 seeds, a pool of 2 processes."""
    out = workdir / "in_domain"
    command = [sys.executable, "-m", "model.simulate", *in_domain_args(workdir, out), "--workers", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out, finished, json.loads((out / "results.json").read_text())


def test_writes_the_three_outputs_and_shows_progress(in_domain):
    out, finished, _ = in_domain
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "learning_curves.png").stat().st_size > 20_000
    assert "simulating" in finished.stderr and "100%" in finished.stderr
    # Every (ordering, seed) run and the two ceilings were logged for --resume.
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2 * len(ORDERINGS) + 2


def test_resume_reuses_runs_of_the_same_code_and_refuses_other_code(in_domain, workdir, tmp_path):
    out, _, results = in_domain
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {row["code"] for row in rows} == {code_hash()} == {results["code"]}
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    main([*in_domain_args(workdir, resumed), "--resume", "--quiet"])
    # Nothing was re-run: the log still has exactly the first run's lines, and the same results.
    assert [json.loads(line) for line in (resumed / "runs.jsonl").read_text().splitlines()] == rows
    again = json.loads((resumed / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["aggregate"] == results["aggregate"]
    # The time of both invocations is reported, and their sum, not only the last one's.
    first, second = again["invocations"]
    assert first["seconds"] == pytest.approx(results["seconds_total"])
    assert first["runs"] == len(rows) and second["runs"] == 0
    assert again["seconds_total"] == pytest.approx(first["seconds"] + second["seconds"])
    assert again["seconds_this_invocation"] == pytest.approx(second["seconds"])
    assert "over 2 invocations" in (resumed / "summary.md").read_text()

    # One run made by other code (or by a version that did not record its code): refused.
    for other in ("0123456789abcdef", None):
        tampered = [dict(rows[0], code=other), *rows[1:]]
        (resumed / "runs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tampered))
        with pytest.raises(SystemExit, match="made by other code.*without --resume"):
            main([*in_domain_args(workdir, resumed), "--resume", "--quiet"])


def test_code_hash_follows_the_model_sources(tmp_path, monkeypatch):
    import model.simulate as simulate

    (tmp_path / "orderings").mkdir()
    (tmp_path / "simulate.py").write_text("a = 1\n")
    (tmp_path / "orderings" / "atlas.py").write_text("b = 2\n")
    monkeypatch.setattr(simulate, "MODEL_DIR", tmp_path)
    first = code_hash()
    assert code_hash() == first
    (tmp_path / "orderings" / "atlas.py").write_text("b = 3\n")
    assert code_hash() != first


def test_every_ordering_spends_exactly_the_budget_on_new_pool_tasks(in_domain):
    _, _, results = in_domain
    assert results["orderings"][0] == "random" and set(results["orderings"]) == set(ORDERINGS)
    assert results["pool_size"] == POOL and results["test_size"] == TEST
    assert results["labels"] == ["Negative", "Positive"]
    for name in ORDERINGS:
        for seed in ("0", "1"):
            run = results["runs"][name][seed]
            assert run["labels_used"] == [20, 40, 60]
            assert len(run["picked"]) == BUDGET - INITIAL == len(set(run["picked"]))
            assert sum(map(sum, run["batch_label_counts"])) == BUDGET - INITIAL
            assert [sum(c) for c in run["batch_label_counts"]] == [BATCH] * 2
            assert run["filled_by_simulator"] == 0, f"{name} returned a short or repeated batch"
            assert all(0 <= a <= 1 for a in run["accuracy"] + run["macro_f1"])


def test_seeds_are_paired_and_differ(in_domain):
    _, _, results = in_domain
    runs = results["runs"]
    for seed in ("0", "1"):
        # Same initial set, test set and head initialisation: identical first point.
        starts = {runs[name][seed]["accuracy"][0] for name in ORDERINGS}
        assert len(starts) == 1
        picked = {name: runs[name][seed]["picked"] for name in ORDERINGS}
        assert picked["random"] != picked["least_confidence"]
    # Different seeds draw different pools and test sets.
    assert runs["random"]["0"]["picked"] != runs["random"]["1"]["picked"]


def test_random_learns_and_the_ceiling_is_above_the_start(in_domain):
    _, _, results = in_domain
    random = results["aggregate"]["random"]
    accuracy = random["accuracy_mean"]
    assert accuracy[-1] > accuracy[0] + 1  # points
    assert random["macro_f1_mean"][-1] > random["macro_f1_mean"][0]
    ceiling = results["aggregate"]["_ceiling"]
    assert ceiling["labels_used"] == POOL
    assert ceiling["accuracy_mean"] > accuracy[0]
    # Paired differences are consistent with the per-seed AULCs.
    lc = results["aggregate"]["least_confidence"]
    per_seed = [
        aulc(results["runs"]["least_confidence"][s]["labels_used"], results["runs"]["least_confidence"][s]["accuracy"])
        - aulc(results["runs"]["random"][s]["labels_used"], results["runs"]["random"][s]["accuracy"])
        for s in ("0", "1")
    ]
    assert lc["aulc_diff_vs_random_mean"] == pytest.approx(np.mean(per_seed))
    assert lc["seeds_beating_random"] == sum(d > 0 for d in per_seed)


def test_summary_has_the_table(in_domain):
    out, finished, results = in_domain
    summary = (out / "summary.md").read_text()
    assert summary in finished.stdout  # printed at the end too
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    header = rows[0]
    for column in ("@40", "@60", "AULC", "ΔAULC vs random", "seeds won", "labels to reach random@60"):
        assert column in header
    table = rows[: 1 + len(ORDERINGS)]
    assert [row.split("|")[1].strip() for row in table[1:]] == results["orderings"]
    column = [c.strip() for c in header.split("|")].index(f"@{BUDGET}")
    assert table[1].split("|")[column].strip() == f"{results['aggregate']['random']['accuracy_mean'][-1]:.1f}"
    assert "**Ceiling**" in summary and "macro-F1" in summary


def test_domain_shift_from_other_file_formats(workdir, capsys):
    out = workdir / "shift"
    main([
        "--data", str(workdir / "tweets.csv"), "--seed-data", str(workdir / "movies.jsonl"),
        "--test", str(workdir / "test_export.json"), "--out", str(out), "--seeds", "2",
        "--orderings", "least_confidence", "--pool-size", "100", "--initial", "40",
        "--batch-size", "20", "--budget", "40", "--cache", str(workdir / "enc.sqlite3"), "--quiet",
    ])
    results = json.loads((out / "results.json").read_text())
    assert results["orderings"] == ["random", "least_confidence"]  # random is always the control
    assert results["test_size"] == 100
    for name in results["orderings"]:
        for seed in ("0", "1"):
            run = results["runs"][name][seed]
            # The movie snippets are free: the curve starts at 0 pool labels.
            assert run["labels_used"] == [0, 20, 40]
            assert len(set(run["picked"])) == 40
    for seed in ("0", "1"):
        assert sum(results["seeds"][seed]["initial_label_counts"]) == 40
    assert "Start** (initial labeled set only, 0 pool labels)" in (out / "summary.md").read_text()


def test_labeled_files_keep_line_breaks_and_skip_unlabeled_rows(workdir, tmp_path):
    # Some tweets contain line breaks inside their (quoted) CSV field.
    tweets = airline_tweets().sample(400, seed=1)
    assert any("\n" in t or "\r" in t for t in tweets.texts)
    loaded = load_labeled_file(workdir / "tweets.csv")
    assert loaded.texts == tweets.texts and loaded.labels == tweets.labels
    rows = [{"text": "line\u2028separator inside", "label": "Positive"}, {"text": "no label yet", "label": None},
            {"text": "empty label", "label": ""}, {"text": "ok", "label": " Negative "}]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    loaded = load_labeled_file(jsonl)
    assert loaded.texts == ["line\u2028separator inside", "ok"] and loaded.labels == ["Positive", "Negative"]
    csv_with_bom = tmp_path / "excel.csv"
    csv_with_bom.write_text("text,label\nhello,Positive\n", encoding="utf-8-sig")
    assert load_labeled_file(csv_with_bom).labels == ["Positive"]


def test_user_errors_say_what_to_do(workdir):
    with pytest.raises(SystemExit, match="lower --budget"):
        main(["--data", str(workdir / "tweets.csv"), "--out", str(workdir / "x"), "--pool-size", "50",
              "--budget", "100", "--quiet"])
    with pytest.raises(SystemExit, match="unknown ordering"):
        main(["--data", "builtin:airline", "--out", str(workdir / "x"), "--orderings", "psychic"])
    with pytest.raises(SystemExit, match="builtin:airline"):
        main(["--data", "builtin:tweets", "--out", str(workdir / "x")])


def test_aulc_and_exact_batches_on_plain_arrays():
    assert aulc([0, 50, 100], [0.8, 0.9, 0.9]) == pytest.approx(87.5)
    # An ordering that repeats a task is completed from its own score order, and counted.
    result = OrderingResult(scores=np.array([0.5, 0.1, 0.9, 0.2]), batch=np.array([3, 3, 1]))
    picked, filled = _exact_batch(result, 3)
    assert sorted(picked.tolist()) == [0, 1, 3] and filled == 1


def test_the_control_is_random_without_the_class_guard_unless_asked():
    """BENCHMARKS.md's control: a team labeling in a uniformly random order."""
    plain = SimulationConfig(data="x.csv", orderings=["random", "margin"], seeds=[0])
    assert plain.ordering_params["random"] == {"class_guard": False}
    assert "margin" not in plain.ordering_params  # the others keep their own defaults
    asked = SimulationConfig(data="x.csv", orderings=["random"], seeds=[0],
                             ordering_params={"random": {"class_guard": True}})
    assert asked.ordering_params["random"] == {"class_guard": True}
    for name in ("simulate_scenarios.sh", "scenarios.sh"):  # the script and its scenario definitions
        script = (REPO / "bench" / name).read_text()
        assert '"class_guard"' not in script  # the scenarios use the simulator's control as it is


def test_invocations_record_survives_garbage_and_sums(tmp_path):
    assert previous_invocations(tmp_path) == []
    (tmp_path / "invocations.json").write_text("{not json")
    assert previous_invocations(tmp_path) == []  # a torn file never stops a resume
    write_invocations(tmp_path, [{"seconds": 10.0}, {"seconds": 2.5}])
    assert [i["seconds"] for i in previous_invocations(tmp_path)] == [10.0, 2.5]


def test_encoding_progress_moves_every_batch_on_small_inputs(tmp_path, monkeypatch):
    """The bar of `encode_table` is fed by `encode_with_cache`'s callback: on a handful of
    texts it moves in batch-sized steps up to the total, not once at the end."""
    import model.encoding_cache as encoding_cache
    from model.encoder import Encoder

    monkeypatch.setattr(encoding_cache, "FLUSH_SECONDS", 0.0)
    calls = []
    texts = [f"the flight to gate {i} was late" for i in range(10)]
    encoder = Encoder("default", device="cpu", batch_size=4)
    encoding_cache.encode_with_cache(encoder, encoding_cache.EncodingCache(tmp_path / "e.sqlite3"), texts,
                                     progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 10), (8, 10), (10, 10)]


def _fake_results(names: list[str], seeds: int = 3) -> dict:
    """results.json's shape for `plot_curves`, from made-up curves (two orderings identical)."""
    rng = np.random.default_rng(0)
    x = [20, 40, 60, 80]
    runs = {}
    for k, name in enumerate(names):
        runs[name] = {}
        for s in range(seeds):
            accuracy = (0.6 + 0.05 * np.arange(4) + 0.01 * k + 0.01 * rng.random(4)).tolist()
            if name == "entropy":  # the same run as margin: one legend entry for both
                accuracy = runs["margin"][s]["accuracy"]
            runs[name][s] = {"labels_used": x, "accuracy": accuracy, "macro_f1": accuracy,
                             "batch_label_counts": [[10, 10]] * 3, "seconds_ordering": 0.0,
                             "seconds_train": 0.0, "filled_by_simulator": 0,
                             "picked": list(range(60)) if name in ("margin", "entropy") else [k, s]}
    return {"config": {"data": "builtin:airline", "seeds": list(range(seeds)), "batch_size": 20},
            "orderings": names, "pool_size": 500,
            "runs": {n: {str(s): r for s, r in per.items()} for n, per in runs.items()},
            "aggregate": aggregate(runs, {}, list(range(seeds)))}


def test_learning_curves_show_every_ordering_with_a_legend_on_every_panel(tmp_path):
    names = ["random", "least_confidence", "margin", "entropy", "predicted_incorrect", "atlas"]
    axes = plot_curves(tmp_path / "curves.png", _fake_results(names))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(axes) == 3
    drawn = [n for n in names if n != "entropy"]
    for ax in axes:
        legend = ax.get_legend()
        assert legend is not None
        texts = [t.get_text() for t in legend.get_texts()]
        assert "margin = entropy" in texts and len(texts) == len(drawn)
        assert len(ax.get_title()) < 60
    # On the curve panels no two orderings share colour, line style and marker at once.
    lines = [line for line in axes[0].get_lines() if line.get_label() in {*drawn, "margin = entropy"}]
    looks = {(str(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(looks) == len(lines) == len(drawn)
    # Paired differences: one error bar per ordering but random, shifted apart sideways.
    bars = {bar.get_label(): bar for bar in axes[2].containers}
    assert set(bars) == {"least_confidence", "margin = entropy", "predicted_incorrect", "atlas"}
    firsts = sorted(bar.lines[0].get_xdata()[0] for bar in bars.values())
    assert len(firsts) == 4 and len(set(firsts)) == 4 and firsts[-1] - firsts[0] < 20


def test_replot_redraws_from_results_json_without_data(tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    results = _fake_results(["random", "margin"])
    results.update(labels=["Negative", "Positive"], pool_label_share=[0.5, 0.5], test_size=100,
                   encoder_id="e", seconds_total=12.0, report_at=[40, 80])
    results["config"].update(initial=20, budget=80, seed_data=None, test=None)
    (out / "results.json").write_text(json.dumps(results))
    assert main(["--replot", "--out", str(out)]) == 0
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "@40 | @80 |" in (out / "summary.md").read_text()  # the run's own --report-at
    with pytest.raises(SystemExit, match="run the simulation"):
        main(["--replot", "--out", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit):
        main(["--out", str(out)])  # without --replot, --data is required
    assert "--data is required" in capsys.readouterr().err
def test_fallbacks_and_overlap_with_least_confidence_on_plain_arrays():
    assert batch_overlap([1, 2, 3, 4], [4, 3, 9, 8]) == 0.5
    assert batch_overlap(np.array([5]), np.array([6])) == 0.0
    assert batch_overlap([], [1]) == 1.0
    rounds = {0: {"rounds_diagnostics": [{"fell_back": True, "least_confidence_overlap": 1.0},
                                         {"fell_back": False, "least_confidence_overlap": 0.5}]},
              1: {"rounds_diagnostics": [{"fell_back": False, "least_confidence_overlap": 0.6},
                                         {"fell_back": False, "least_confidence_overlap": 0.3}]}}
    out = aggregate_diagnostics({"atlas": rounds, "old": {0: {"accuracy": []}}}, [0, 1])
    assert set(out) == {"atlas"}  # runs recorded before the diagnostics existed are left out
    atlas = out["atlas"]
    counts = (atlas["rounds"], atlas["rounds_fallen_back"], atlas["seeds"], atlas["first_round_fallen_back"])
    assert counts == (4, 1, 2, 1)
    assert atlas["least_confidence_overlap_mean"] == pytest.approx(0.6)
    assert atlas["first_round_least_confidence_overlap_mean"] == pytest.approx(0.8)


def test_summary_says_how_often_each_ordering_fell_back_and_copied_least_confidence(in_domain):
    out, _, results = in_domain
    diagnostics = results["ordering_diagnostics"]
    rounds = 2 * (BUDGET - INITIAL) // BATCH  # 2 seeds
    assert set(diagnostics) == set(results["orderings"])
    for name, d in diagnostics.items():
        assert d["rounds"] == rounds and 0 <= d["rounds_fallen_back"] <= rounds, name
        assert 0.0 <= d["least_confidence_overlap_mean"] <= 1.0
    assert diagnostics["least_confidence"]["least_confidence_overlap_mean"] == 1.0
    assert diagnostics["least_confidence"]["rounds_fallen_back"] == 0
    assert diagnostics["random"]["least_confidence_overlap_mean"] < 0.5
    versus = results["versus_least_confidence"]
    assert "least_confidence" not in versus and set(versus) == set(results["orderings"]) - {"least_confidence"}
    random, least = results["runs"]["random"], results["runs"]["least_confidence"]
    diffs = [aulc(random[s]["labels_used"], random[s]["accuracy"]) - aulc(least[s]["labels_used"], least[s]["accuracy"])
             for s in random]
    assert versus["random"]["accuracy_aulc_diff_mean"] == pytest.approx(np.mean(diffs))
    summary = (out / "summary.md").read_text()
    assert "Fallbacks and overlap with least confidence" in summary
    assert "Paired difference from least confidence" in summary
    section = summary.split("Fallbacks and overlap with least confidence", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| predicted_incorrect |"))
    assert f"{diagnostics['predicted_incorrect']['rounds_fallen_back']}/{rounds}" in row


# -- several controls and multi-label data (issue 13, point 5) ---------------------------------


def test_score_controls_per_control_and_overall_on_plain_arrays():
    from model.heads import ControlSpec
    from model.simulate import score_controls

    topic = ControlSpec("topic", ["a", "b", "c"])
    tags = ControlSpec("tags", ["x", "y"], multi_label=True)
    # Five tasks; the last answers only `topic`, the fourth only `tags`.
    topic_truth = np.array([0, 1, 2, -1, 1])
    topic_pred = np.array([0, 1, 0, 2, 1])  # wrong on task 2; task 3 does not count
    tags_truth = np.array([[1, 0], [1, 1], [0, 1], [0, 1], [-1, -1]], dtype=np.int8)
    tags_pred = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1]], dtype=bool)  # task 1 misses y
    scores = score_controls([topic, tags], [topic_pred, tags_pred], [topic_truth, tags_truth])
    assert scores["per_control"]["topic"]["accuracy"] == pytest.approx(3 / 4)
    # Exact match: the predicted set must be the true set (task 1's {x} is not {x, y}).
    assert scores["per_control"]["tags"]["accuracy"] == pytest.approx(3 / 4)
    # Macro-F1 over the choices: x (P 1, R 1) and y (P 1, R 2/3).
    assert scores["per_control"]["tags"]["macro_f1"] == pytest.approx((1 + 0.8) / 2)
    # Topic macro-F1 over its three labels: a F1 2/3, b 1, c 0.
    assert scores["per_control"]["topic"]["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # Overall: tasks 0, 3 and 4 have every answered control right; 1 and 2 do not.
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macro_f1"] == pytest.approx(np.mean([(2 / 3 + 1) / 3, 0.9]))
    # One single-choice control: the overall figures are that control's.
    alone = score_controls([topic], [topic_pred], [topic_truth])
    assert alone["accuracy"] == alone["per_control"]["topic"]["accuracy"] == pytest.approx(3 / 4)
    assert alone["macro_f1"] == alone["per_control"]["topic"]["macro_f1"]


def test_the_initial_set_covers_every_choice_of_every_control():
    from model.heads import ControlSpec
    from model.simulate import choice_matrix, cover_choices

    rng = np.random.default_rng(0)
    specs = [ControlSpec("role", ["p", "q", "r"]), ControlSpec("lang", ["c", "py", "pl", "rare"], multi_label=True)]
    n = 200
    role = rng.choice(3, size=n, p=[0.9, 0.07, 0.03])
    lang = (rng.random((n, 4)) < [0.6, 0.3, 0.2, 0.0]).astype(np.int8)
    lang[[17, 123], 3] = 1  # two tasks use the rare choice
    uses = choice_matrix(specs, [role, lang])
    assert uses.shape == (n, 7) and (uses[:, :3].sum(axis=1) == 1).all()
    initial = np.arange(10)
    covered = cover_choices(initial, uses, np.random.default_rng(1))
    assert len(covered) == 10 and len(set(covered.tolist())) == 10
    assert uses[covered].any(axis=0).tolist() == uses.any(axis=0).tolist()
    # A choice no pool task uses cannot be covered and is not an error.
    uses[:, 6] = False
    assert not uses[cover_choices(initial, uses, np.random.default_rng(1))][:, 6].any()


def test_several_label_columns_and_multi_label_files(tmp_path):
    from model.datasets import load_annotated_file

    csv_path = tmp_path / "tickets.csv"
    csv_path.write_text("text,labels,urgency\n"
                        "refund please,billing|refunds,high\n"
                        "app crashes,bug,\n"
                        "what is this,,\n"  # answers nothing: an unlabeled task, skipped
                        'both again,"[""bug"", ""billing""]",low\n', encoding="utf-8")
    data = load_annotated_file(csv_path, label_columns=["labels", "urgency"])
    assert data.texts == ["refund please", "app crashes", "both again"]
    labels, urgency = data.columns
    assert labels.multi_label and not urgency.multi_label
    assert labels.answers == [("billing", "refunds"), ("bug",), ("bug", "billing")]
    assert urgency.answers == ["high", None, "low"]
    assert labels.choices() == ["billing", "bug", "refunds"]
    # Without names: the `labels` column alone.
    assert [c.name for c in load_annotated_file(csv_path).columns] == ["labels"]

    jsonl = tmp_path / "tickets.jsonl"
    rows = [{"text": "t1", "topic": ["a", "b"], "tone": "calm"}, {"text": "t2", "topic": ["a"], "tone": "angry"},
            {"text": "t3", "topic": "b", "tone": "calm"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    topic, tone = load_annotated_file(jsonl, label_columns=["topic", "tone"]).columns
    assert topic.multi_label and topic.answers == [("a", "b"), ("a",), ("b",)]
    assert tone.answers == ["calm", "angry", "calm"]
    # --multi-label makes a column of single values multi-label.
    assert load_annotated_file(jsonl, ["tone"], multi_label=["tone"]).columns[0].answers == [
        ("calm",), ("angry",), ("calm",)]
    with pytest.raises(ValueError, match="no column 'urgency'"):
        load_annotated_file(jsonl, ["urgency"])

    export = [{"id": 1, "data": {"text": "t1"}, "annotations": [{"id": 1, "result": [
        {"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": ["a", "b"]}},
        {"from_name": "tone", "to_name": "text", "type": "choices", "value": {"choices": ["calm"]}}]}]},
        {"id": 2, "data": {"text": "t2"}, "annotations": [{"id": 2, "result": [
            {"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": ["b"]}}]}]}]
    (tmp_path / "export.json").write_text(json.dumps(export))
    topic, tone = load_annotated_file(tmp_path / "export.json").columns
    assert (topic.name, tone.name) == ("topic", "tone")
    assert topic.multi_label and topic.answers == [("a", "b"), ("b",)]
    assert not tone.multi_label and tone.answers == ["calm", None]


DEBIAN_INDEX = """Package: editor-one
Description: small text editor for the terminal
Tag: interface::commandline, role::program, use::editing, works-with::text

Package: viewer-two
Description: image viewer and converter
Tag: role::program, use::converting, use::viewing, works-with::image:raster

Package: viewer-two-dup
Description: image viewer and converter
Tag: role::program, use::viewing

Package: lib-three
Description: library for parsing things
Tag: role::devel-lib, role::shared-lib, use::TODO

Package: untagged
Description: nothing to learn here
"""


def test_debian_package_index_as_label_columns():
    from model.datasets import debian_packages, parse_debian_packages

    packages = parse_debian_packages(DEBIAN_INDEX)
    # Untagged packages and repeated descriptions are skipped; image:raster counts as image.
    assert [d for d, _ in packages] == ["small text editor for the terminal", "image viewer and converter",
                                        "library for parsing things"]
    assert packages[1][1]["works-with"] == {"image"} and "use" not in packages[2][1]  # TODO dropped
    use = debian_packages(multi=("use",), index=DEBIAN_INDEX)
    assert use.texts == ["small text editor for the terminal", "image viewer and converter"]
    assert use.columns[0].multi_label and use.columns[0].answers == [("editing",), ("converting", "viewing")]
    # A single-choice facet keeps only packages with exactly one tag in it (lib-three has two).
    both = debian_packages(single=("role",), multi=("works-with",), index=DEBIAN_INDEX)
    assert [c.answers for c in both.columns] == [["program", "program"], [("text",), ("image",)]]


def test_builtin_debian_works_with_is_one_single_choice_question(tmp_path, monkeypatch):
    """The many-class scenario's corpus, read the way the simulator reads it (`builtin:`),
    from a small index instead of the machine's own."""
    from model.simulate import BUILTIN, load_source

    index = tmp_path / "Packages"
    index.write_text(DEBIAN_INDEX, encoding="utf-8")
    monkeypatch.setenv("DEBIAN_PACKAGES_FILE", str(index))
    assert "debian_works_with" in BUILTIN
    data = load_source("builtin:debian_works_with")
    # viewer-two-dup repeats a description, lib-three has no works-with tag.
    assert data.texts == ["small text editor for the terminal", "image viewer and converter"]
    assert len(data.columns) == 1 and not data.columns[0].multi_label
    assert data.columns[0].answers == ["text", "image"]


def test_two_label_columns_through_the_command_line(tmp_path):
    """Two controls (one single-choice, one multi-label) from a JSONL file, end to end. The
    plumbing needs no particular corpus (Debian's package index is not on every machine):
    airline tweets with their sentiment as `role`, and as the multi-label `lang` the marks
    each tweet carries (a question, an exclamation, neither)."""
    from model.datasets import airline_tweets

    tweets = airline_tweets(("Positive", "Negative", "Neutral")).sample(240, seed=3)

    def marks(text: str) -> list[str]:
        found = [name for name, mark in (("question", "?"), ("exclaim", "!")) if mark in text]
        return found or ["plain"]

    path = tmp_path / "packages.jsonl"
    path.write_text("".join(json.dumps({"text": t, "role": r, "lang": marks(t)}) + "\n"
                            for t, r in zip(tweets.texts, tweets.labels)))
    out = tmp_path / "out"
    main(["--data", str(path), "--label-columns", "role,lang", "--multi-label", "lang", "--out", str(out),
          "--seeds", "2", "--orderings", "predicted_incorrect", "--pool-size", "100", "--test-size", "80",
          "--initial", "20", "--batch-size", "20", "--budget", "40", "--cache", str(tmp_path / "enc.sqlite3"),
          "--quiet"])
    results = json.loads((out / "results.json").read_text())
    assert [(c["name"], c["multi_label"]) for c in results["controls"]] == [("role", False), ("lang", True)]
    for name in ("random", "predicted_incorrect"):
        for seed in ("0", "1"):
            run = results["runs"][name][seed]
            assert run["labels_used"] == [20, 40] and len(set(run["picked"])) == 20
            for control in ("role", "lang"):
                curve = run["per_control"][control]
                assert len(curve["accuracy"]) == len(curve["macro_f1"]) == 2
                assert all(0 <= v <= 1 for v in curve["accuracy"] + curve["macro_f1"])
            # Overall: every control right is at most as often as each control alone.
            assert all(a <= min(run["per_control"][c]["accuracy"][i] for c in ("role", "lang")) + 1e-9
                       for i, a in enumerate(run["accuracy"]))
        # Same initial set and test set in a seed: every ordering starts from the same point.
    assert results["runs"]["random"]["0"]["accuracy"][0] == results["runs"]["predicted_incorrect"]["0"]["accuracy"][0]
    per_control = results["aggregate_per_control"]
    assert set(per_control) == {"role", "lang"}
    assert "macro_f1_aulc_diff_vs_random_ci95" in per_control["lang"]["predicted_incorrect"]
    summary = (out / "summary.md").read_text()
    assert "## Control `role` (single-choice)" in summary and "## Control `lang` (multi-label)" in summary
    assert "every control right" in summary and "exact-match accuracy" in summary


def test_a_rarer_minority_class_is_a_fixed_thinned_subset():
    from model.datasets import AnnotatedTexts, LabelColumn
    from model.simulate import thin_class

    labels = ["Positive"] * 40 + ["Negative"] * 60
    data = AnnotatedTexts([f"t{i}" for i in range(100)], [LabelColumn("label", labels)])
    thinned = thin_class(data, "Positive:0.1")
    answers = thinned.columns[0].answers
    assert answers.count("Negative") == 60 and answers.count("Positive") == round(0.1 / 0.9 * 60)
    assert thinned.texts == thin_class(data, "Positive:0.1").texts  # the same every time
    assert set(thinned.texts) <= set(data.texts)
    for bad in ("Positive", "Positive:2", "Neutral:0.1", "Positive:0.5"):
        with pytest.raises(SystemExit, match="rare-class"):
            thin_class(data, bad)


def test_initial_order_kmeans_starts_every_ordering_but_the_control_from_the_cold_start(workdir):
    """`--initial-order kmeans`: least confidence starts from the head of the service's
    k-means cold-start order over its seed's pool (recomputed here from the same cached
    vectors), random from the paired random set; the grid and budget are unchanged and the
    run key differs, so `--resume` never mixes the two starts."""
    from model.cold_start import representative_order
    from model.simulate import config_from_args, encode_table, parse_args, plan_seed, table_from_config

    out = workdir / "kmeans_start"
    argv = [*in_domain_args(workdir, out), "--seeds", "1", "--orderings", "least_confidence",
            "--initial-order", "kmeans", "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["initial_order"] == "kmeans"
    config = config_from_args(parse_args(argv))
    table = table_from_config(config)
    plan = plan_seed(table, config, 0)
    features, _, _ = encode_table(table, [plan], config, all_layers=False, progress=False)
    cold = representative_order(features[plan.pool], seed=0).order[:INITIAL]
    lc, control = results["runs"]["least_confidence"]["0"], results["runs"]["random"]["0"]
    assert lc["initial"] == [int(plan.pool[i]) for i in cold]
    assert set(lc["initial"]) != set(int(plan.pool[i]) for i in plan.initial)
    assert "initial" not in control  # the control keeps the random set
    assert not set(control["picked"]) & set(int(plan.pool[i]) for i in plan.initial)
    assert lc["labels_used"] == control["labels_used"] == [20, 40, 60]
    assert len(set(lc["initial"]) | set(lc["picked"])) == BUDGET  # no task bought twice
    assert config.run_key("least_confidence") != SimulationConfig(
        **{**results["config"], "initial_order": "random"}).run_key("least_confidence")
    assert config.run_key("random") == SimulationConfig(
        **{**results["config"], "initial_order": "random"}).run_key("random")
    summary = (out / "summary.md").read_text()
    assert "k-means cold start" in summary and "(the k-means cold start's)" in summary
    with pytest.raises(SystemExit):
        parse_args([*in_domain_args(workdir, out), "--initial-order", "zero_shot"])


def test_paired_points_merges_another_outputs_ordering_only_over_the_same_control(tmp_path):
    """`bench/paired_points.py --merge`: margin of a second output joins the first as its own
    ordering, paired per seed; an output whose random runs differ (another scenario or
    seeds) is refused."""
    from bench.paired_points import merge, table

    def run(values):
        return {"labels_used": [50, 100], "accuracy": values, "macro_f1": values}

    def output(name, margin, control=(0.5, 0.6), pool_size=3000):
        results = {"orderings": ["random", "margin"], "report_at": [100],
                   "config": {"data": "builtin:airline", "pool_size": pool_size, "initial": 50},
                   "runs": {"random": {s: run(list(control)) for s in ("0", "1")},
                            "margin": {s: run(margin[int(s)]) for s in ("0", "1")}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        return results

    first = output("a", [[0.6, 0.70], [0.6, 0.72]])
    output("b", [[0.6, 0.68], [0.6, 0.69]])
    merge(first, f"other={tmp_path / 'b'}:margin")
    assert first["orderings"] == ["random", "margin", "other"]
    lines = table(first, "other", "accuracy")
    row = next(line for line in lines if line.startswith("| margin |"))
    assert "+2.5" in row  # (2 + 3) / 2 points ahead of the other setting at 100 labels
    output("c", [[0.6, 0.7], [0.6, 0.7]], control=(0.5, 0.61))
    with pytest.raises(SystemExit, match="not the same scenario"):
        merge(first, f"x={tmp_path / 'c'}:margin")
    with pytest.raises(SystemExit, match="no runs of"):
        merge(first, f"x={tmp_path / 'b'}:atlas")
    # --by-config: another start (other control runs) over the same pools is accepted,
    # other pools are not.
    merge(first, f"other_start={tmp_path / 'c'}:margin", by_config=True)
    assert first["orderings"][-1] == "other_start"
    output("d", [[0.6, 0.7], [0.6, 0.7]], pool_size=1000)
    with pytest.raises(SystemExit, match="pool_size"):
        merge(first, f"y={tmp_path / 'd'}:margin", by_config=True)
