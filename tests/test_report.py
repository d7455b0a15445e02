"""report.md pieces that users read: the top-5 rows of the first images, framework beside device."""

from __future__ import annotations

from tasks.report import top5_examples


def test_top5_rows_show_class_names_from_framework_and_device():
    rows = top5_examples(
        [
            {
                "file": "coffee.jpg",
                "label": 967,
                "framework": [[967, "espresso", 0.9]],
                "device": [[967, "espresso", 0.88]],
            }
        ]
    )
    assert rows[-1] == "| coffee.jpg | 967 | 967 espresso (0.90) | 967 espresso (0.88) |"
    assert top5_examples([]) == []
