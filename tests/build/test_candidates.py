"""Pick best per operator (tasks.build.candidates) on recorded candidate timings: the numbers are
real H200 figures of the kind pick-best measures (cuDNN vs TVM's DLight kernels)."""

from __future__ import annotations

from tasks.build.candidates import Candidate, OperatorChoice, choices_summary, choices_table, choose


def test_fastest_usable_candidate_wins():
    choice = choose(
        "conv2d_3x3_64",
        [Candidate("cudnn", 0.0081, None, "algo 1"), Candidate("default", 0.0412, None, "Matmul (Fallback 0.2100)")],
    )
    assert choice.chosen == "cudnn" and choice.chosen_ms == 0.0081 and choice.chosen_detail == "algo 1"


def test_depthwise_default_rule_beats_the_library_and_keeps_its_rule():
    choice = choose("conv2d_depthwise", [Candidate("cudnn", 0.061), Candidate("default", 0.054, None, "Fallback")])
    assert choice.chosen == "default" and choice.chosen_detail == "Fallback"


def test_within_the_tie_margin_tvm_kernels_win_over_a_library():
    choice = choose("matmul", [Candidate("cublas", 0.0100), Candidate("default", 0.0101)])
    assert choice.chosen == "default"  # 1 % slower, but no extra runtime library to ship


def test_failed_candidates_never_win_and_default_stays_without_any():
    failed = [Candidate("cudnn", None, "CUDNN_STATUS_NOT_SUPPORTED"), Candidate("tuned", 0.001, "wrong result")]
    assert choose("conv", failed + [Candidate("default", 0.5)]).chosen == "default"
    assert choose("conv", failed).chosen == "default"


def test_choice_round_trips_through_json_and_the_table_marks_the_winner():
    choice = choose("conv2d_a", [Candidate("cudnn", 0.01, None, "algo 1"), Candidate("default", 0.02)])
    again = OperatorChoice.from_json(choice.to_json())
    assert again == choice and again.chosen_detail == "algo 1"
    older = OperatorChoice.from_json({"operator": "x", "chosen": "default", "candidates": [{"backend": "default"}]})
    assert older.chosen_detail is None  # records written before `detail` existed still load
    table = choices_table([choice, choose("conv2d_b", [Candidate("cudnn", None, "no"), Candidate("default", 0.3)])])
    assert "| operator | default ms | cudnn ms | chosen |" in table
    assert "| conv2d_a | 0.0200 | **0.0100** | cudnn |" in table
    assert "failed" in table
    summary = choices_summary([choice, again])
    assert summary == {"operators": 2, "won": {"cudnn": 2}, "chosen_ms_total": 0.02}
