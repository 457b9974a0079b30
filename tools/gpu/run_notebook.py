"""Run a chapter notebook's code cells in order, as one script: python run_notebook.py NB.ipynb

For a remote GPU job whose Python has no Jupyter (tools/gpu/README.md). Carrying
jupyter, nbclient, ipykernel and pyzmq there would take megabytes of the folder sent, and
a kernel adds nothing here: the notebooks only call mrilib, and every figure is written
by a library function (``save=``), so executing the cells' code in one namespace writes
the same files; a cell's last expression is printed, as Jupyter would show it. Cells must
be plain Python (no magics: the chapter notebooks use none). Each cell's index and wall
seconds are printed; the first failing cell stops the run with its index, exit status 1.
"""
import ast
import json
import sys
import time
import traceback

import matplotlib

matplotlib.use("Agg")  # no display there; figures are saved by the library
import matplotlib.pyplot as plt  # noqa: E402


def code_cells(path: str) -> list[str]:
    with open(path) as f:
        notebook = json.load(f)
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def run_cell(source: str, name: str, namespace: dict) -> None:
    """Execute one cell; print its last expression's value as Jupyter would show it
    (unless None or silenced with a trailing ';'), since e.g. a summary table is read
    from it."""
    tree = ast.parse(source, name)
    last = tree.body[-1] if tree.body else None
    if isinstance(last, ast.Expr) and not source.rstrip().endswith(";"):
        tree.body.pop()
        exec(compile(tree, name, "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
        if value is not None:
            print(repr(value))
    else:
        exec(compile(tree, name, "exec"), namespace)


def main(path: str) -> int:
    try:  # tables whole in a log, as a notebook shows them, not cut to 80 columns
        import pandas as pd
        pd.set_option("display.width", 250)
        pd.set_option("display.max_columns", 50)
    except ImportError:
        pass
    namespace = {"__name__": "__main__"}
    for i, source in enumerate(code_cells(path), 1):
        if any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()):
            print(f"{path}: cell {i} uses IPython syntax, which this runner cannot execute")
            return 1
        start = time.perf_counter()
        try:
            run_cell(source, f"{path}#cell{i}", namespace)
        except Exception:
            traceback.print_exc()
            print(f"{path}: cell {i} failed after {time.perf_counter() - start:.1f} s")
            return 1
        plt.close("all")
        print(f"{path}: cell {i} done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python run_notebook.py NOTEBOOK.ipynb")
    sys.exit(main(sys.argv[1]))
