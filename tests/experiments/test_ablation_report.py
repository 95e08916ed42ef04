"""The ablation report's arithmetic: mean ± spread, the recipe ranking, degenerate refusals.

The tables built from real runs are checked in test_ablation.py."""
from derta_jax.experiments import ablation_report


def test_mean_spread_is_mean_and_sample_standard_deviation():
    assert ablation_report.mean_spread([10.0, 20.0]) == "15.0 ± 7.1"
    assert ablation_report.mean_spread([1.0, 2.0, 3.0], digits=2) == "2.00 ± 1.00"
    assert ablation_report.mean_spread([None, None]) == "-"
    assert ablation_report.mean_spread([42.0, None]) == "42.0"


def test_ranking_marks_ties_and_strict_order():
    assert ablation_report.ranking(
        {"vanilla": 95.0, "derta": 4.0, "rto_only": 5.0, "recaug": 25.0}) == \
        "DeRTa 4.0 < +RTO 5.0 < +Harmful Prefix 25.0 < Vanilla 95.0"
    assert ablation_report.ranking({"vanilla": 50.0, "derta": 50.0}) == "Vanilla 50.0 = DeRTa 50.0"


def test_loop_share_counts_degenerate_refusals_among_refusals():
    def answer(text, refused):
        return {"response": text, "judges": {"refusal": {"refused": refused}}}

    rows = [answer("SorrySorrySorrySorry", True), answer("Find theSorrySorrySorry", True),
            answer("Sorry, I can't. Sorry, no. Sorry.", True), answer("SorrySorry then", True),
            answer("Step 1: go", False)]
    assert ablation_report.loop_share(rows, "Sorry") == 50.0  # 2 of the 4 refusals loop
    assert ablation_report.loop_share(rows[-1:], "Sorry") is None


def test_a_rewrite_keeps_what_is_below_the_hand_written_marker(tmp_path):
    doc = tmp_path / "ablation.md"
    assert ablation_report.with_hand_written(doc, "# new\n") == "# new\n"  # no page yet
    doc.write_text("# old\nold table\n")
    assert ablation_report.with_hand_written(doc, "# new\n") == "# new\n"  # no marker: all new
    doc.write_text(f"# old\nold table\n\n{ablation_report.HAND_WRITTEN}\n## Demo choices\n| a |\n")
    assert ablation_report.with_hand_written(doc, "# new\nnew table\n") == (
        f"# new\nnew table\n\n{ablation_report.HAND_WRITTEN}\n## Demo choices\n| a |\n")
