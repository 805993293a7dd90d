"""The model card (README.md) of a run's LoRA / model folder: the Hub's card format with diffusers' metadata (the
base model, ``library_name: diffusers``, the tags diffusers' own LoRA trainings set), how to load the weights,
the recipe the run was trained with, and its last in-run evaluation. ``huggingface_hub.ModelCard.load`` and
diffusers' ``load_or_create_model_card`` read it."""
from __future__ import annotations

from pathlib import Path

import yaml

TAGS = ["flowrl", "diffusers", "diffusers-training", "reinforcement-learning", "grpo", "text-to-image"]


def results_of(rows: list[dict]) -> dict[str, float]:
    """The last row with eval figures: {score name: value} (what the run's evaluator measured last)."""
    for row in reversed(rows):
        evals = {k[len("eval/"):].removesuffix("_mean"): v for k, v in row.items()
                 if k.startswith("eval/") and isinstance(v, float)}
        if evals:
            return {"iteration": row["iteration"] + 1, **evals}
    return {}


def card_text(cfg_dict: dict, folder_kind: str, results: dict) -> str:
    base = cfg_dict["model"]["path"]
    method = cfg_dict["training"]["objective"]
    # the shipped shapes-world base is a name flowrl resolves to a folder inside the package
    # a base named toy:<...> / tiny:<...> is flowrl's (shipped in the package, or built in code)
    named = ":" in base and not Path(base).exists()
    imports = ["from flowrl.models import load_pipeline" if named else "from diffusers import DiffusionPipeline"]
    opening = f'load_pipeline("{base}")' if named else f'DiffusionPipeline.from_pretrained("{base}")'
    if folder_kind == "lora":
        load = [f"pipe = {opening}", 'pipe.load_lora_weights("path/to/this/folder")']
    else:
        imports = ["from diffusers import DiffusionPipeline"]
        load = ['pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")']
    title = "LoRA" if folder_kind == "lora" else "Fine-tuned weights"
    lines = [f"# {title} of {base}, trained with flowrl ({method})", "",
             f"Trained from `{base}` for {cfg_dict['run']['iterations']} iterations of group-relative RL on the "
             f"rewards `{cfg_dict['rewards']['components']}`.", "", "## How to use", "", "```python", *imports, "",
             *load, "```", ""]
    if results:
        lines += ["## Results", "", f"The run's last in-run evaluation (iteration {results['iteration']}, ODE "
                  "samples of the eval prompts with the trained weights):", "", "| score | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in results.items() if k != "iteration"]
        lines += ["", "`flowrl bench` measures the published protocols (GenEval, OCR, reward tables).", ""]
    lines += ["## Recipe", "", "The run's full configuration (`flowrl train` reads it back as a recipe):", "",
              "```yaml", yaml.safe_dump(cfg_dict, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, cfg_dict: dict, folder_kind: str, rows: list[dict]) -> Path:
    """README.md in ``folder`` (a diffusers LoRA or pipeline folder). Main process only."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", base_model=cfg_dict["model"]["path"], license=None)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(cfg_dict, folder_kind, results_of(rows))}")
    card = populate_model_card(card, tags=TAGS + (["lora"] if folder_kind == "lora" else []))
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path


__all__ = ["card_text", "results_of", "write_model_card"]
