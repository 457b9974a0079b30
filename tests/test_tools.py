"""tools/gpu/run_notebook.py: the GPU machine's way of running a chapter notebook."""
import importlib.util
import json
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[1] / "tools" / "gpu" / "run_notebook.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("run_notebook", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook(tmp_path, *cells, name="nb.ipynb"):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]}] + [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
         "source": [line + "\n" for line in code.split("\n")]} for code in cells]
    path = tmp_path / name
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                "nbformat_minor": 5}))
    return str(path)


def test_cells_run_in_order_in_one_namespace(runner, tmp_path, capsys):
    out = tmp_path / "made.txt"
    nb = notebook(tmp_path, "import matplotlib.pyplot as plt\nvalue = 2",
                  "plt.plot([1, 2]); value *= 21",
                  f"open({str(out)!r}, 'w').write(str(value))")
    assert runner.main(nb) == 0
    assert out.read_text() == "42"
    assert "cell 3 done" in capsys.readouterr().out


def test_a_cells_last_expression_is_shown_unless_silenced(runner, tmp_path, capsys):
    nb = notebook(tmp_path, "x = 6\nx * 7", "x * 1000;", "print('p')\nNone", "[x] * 2")
    assert runner.main(nb) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if "cell" not in line]
    assert shown == ["42", "p", "[6, 6]"]


def test_the_first_failing_cell_stops_the_run(runner, tmp_path, capsys):
    out = tmp_path / "never.txt"
    nb = notebook(tmp_path, "x = 1", "raise ValueError('bad input in cell two')",
                  f"open({str(out)!r}, 'w').write('ran')")
    assert runner.main(nb) == 1
    printed = capsys.readouterr()
    assert "cell 2 failed" in printed.out and "bad input in cell two" in printed.err
    assert not out.exists()


def test_ipython_syntax_is_refused_by_name(runner, tmp_path, capsys):
    nb = notebook(tmp_path, "x = 1", "%matplotlib inline\ny = 2")
    assert runner.main(nb) == 1
    assert "cell 2 uses IPython syntax" in capsys.readouterr().out


@pytest.mark.parametrize("chapter", ["02_synthetic_images", "03_gradcam_real_vs_synthetic"])
def test_the_chapters_sent_to_the_gpu_are_plain_python(runner, chapter):
    path = RUNNER.parents[2] / "notebooks" / f"{chapter}.ipynb"
    for i, source in enumerate(runner.code_cells(str(path)), 1):
        compile(source, f"{chapter}#cell{i}", "exec")  # a magic would be a SyntaxError
