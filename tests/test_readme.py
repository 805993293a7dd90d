"""The README's promises: its MDP example runs as written."""
import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_mdp_example_runs(tmp_path, monkeypatch, capsys):
    code = _python_block_after("## Use the MDP wrappers in your own code")
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(script), run_name="__main__")
    grads = [p.grad for p in ns["policy"].denoiser.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    shape, n_edges, drift = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 2)
    assert shape == "torch.Size([8, 3, 64, 64])" and int(n_edges) == 32 and float(drift) <= 1e-6


def test_reliability_table_names_tests_that_exist():
    """Each row of "Reliability" names a test file and functions (``::name`` continues the row's last file)."""
    text = README.read_text()
    section = text[text.index("## Reliability"):text.index("## Benchmark a model")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line.rsplit("|", 2)[1]]
    assert len(rows) >= 10
    root = README.parent
    for row in rows:
        current = None
        for ref in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[1]):
            path, _, name = ref.partition("::")
            if path:
                current = root / (path if "/" in path else f"tests/{path}")
                assert current.is_file(), ref
            if name:
                assert re.search(rf"^def {name}\(", current.read_text(), re.M), ref
