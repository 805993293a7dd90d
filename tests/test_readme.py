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
