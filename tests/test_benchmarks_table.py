"""The Markdown table every benchmark prints (benchmarks/table.py)."""
import pytest

from benchmarks.table import markdown_table


def test_columns_line_up_and_align_as_asked():
    text = markdown_table(["impl", "ms"], [("kernel", "1.25"), ("chunked torch", "120.50")], "lr")
    lines = text.splitlines()
    assert lines == [
        "| impl          |     ms |",
        "|---------------|-------:|",
        "| kernel        |   1.25 |",
        "| chunked torch | 120.50 |",
    ]


def test_non_string_cells_and_wide_header():
    lines = markdown_table(["a", "a long header"], [(3, None)], "rl").splitlines()
    assert lines[2] == "| 3 | None          |"
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize("rows, align, match", [
    ([("x", "y")], "l", "align 'l' needs one"),
    ([("x", "y")], "lc", "align 'lc' needs one"),
    ([("x",)], "ll", "row 0 has 1 cells for 2 columns"),
])
def test_bad_layout_is_refused(rows, align, match):
    with pytest.raises(AssertionError, match=match):
        markdown_table(["a", "b"], rows, align)


def test_gpu_check_runs_every_gpu_test_file():
    """benchmarks/gpu_check.sh names the GPU test files one by one (kernel tests first): a new file
    with GPU tests must be added there, or the GPU session would never run it."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = (repo / "benchmarks" / "gpu_check.sh").read_text()
    listed = re.search(r'PYTEST_ARGS="\$\{PYTEST_ARGS:--m gpu ([^}]*) -q\}"', script).group(1).split()
    uses_gpu_mark = re.compile(r"^(@pytest\.mark\.gpu\b|pytestmark = .*pytest\.mark\.gpu\b)", re.M)
    marked = sorted(f"tests/{p.name}" for p in (repo / "tests").glob("test_*.py") if uses_gpu_mark.search(p.read_text()))
    assert sorted(listed) == marked
    assert listed[0] == "tests/test_wkv7_kernel.py"
