"""Inputs that used to get through: a plan whose groups hold one sample (every advantage 0, the run trains on
nothing and says nothing) and a LoRA that does not fit the model (peft's size-mismatch traceback, or a module
silently dropped). Each is one line naming the problem, before any sampling."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowrl.cli import main
from flowrl.core import ADVANTAGE_ESTIMATORS
from flowrl.train.config import ConfigError, load_config
from flowrl.train.finetune import LORA_FILE, add_lora, check_lora_fits, load_lora, save_lora
from flowrl.train.validate import validate, vanishes_on_singletons

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMOKE, NFT, TEMPFLOW = CONFIGS / "tiny_smoke.yaml", CONFIGS / "toy_nft.yaml", CONFIGS / "toy_tempflow.yaml"
TINY = ["--model", "tiny:sd3", "--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "16"]


def _check(recipe, *overrides):
    validate(load_config(recipe, list(overrides)))


@pytest.mark.parametrize("estimator", sorted(ADVANTAGE_ESTIMATORS))
def test_every_estimator_gives_zero_on_groups_of_one(estimator):
    """The premise of the refusal, on the estimators themselves: distinct rewards, one per group, give 0."""
    from flowrl.core import combine_rewards

    r = torch.tensor([0.2, 0.9, 3.0, -1.0], dtype=torch.float64)
    kw = {"mode": "sum_then_normalize", "estimator": estimator, "eps": 1e-4, "clip": None}
    adv = combine_rewards({"r": r}, {"r": 1.0}, torch.arange(4), **kw)
    assert torch.equal(adv, torch.zeros(4, dtype=torch.float64))
    assert vanishes_on_singletons(estimator, "sum_then_normalize", 1e-4, None)
    pairs = combine_rewards({"r": r}, {"r": 1.0}, torch.tensor([0, 0, 1, 1]), **kw)
    assert (pairs != 0).all()  # groups of two do compare


@pytest.mark.parametrize("estimator", sorted(ADVANTAGE_ESTIMATORS))
def test_a_group_of_one_is_refused_at_config_time(estimator):
    with pytest.raises(ConfigError, match=rf"groups of 1 sample .*advantages.estimator={estimator}.*G >= 2"):
        _check(SMOKE, "sampling.plan={name: flat, G: 1}", f"advantages.estimator={estimator}")
    _check(SMOKE, "sampling.plan={name: flat, G: 2}", f"advantages.estimator={estimator}")  # not over-broad


def test_a_per_prompt_history_is_a_baseline_for_a_group_of_one():
    _check(SMOKE, "sampling.plan={name: flat, G: 1}", "advantages.per_prompt_tracker=true")


@pytest.mark.parametrize("overrides,needle", [
    (["sampling.plan={name: trunk_branches, K: 1, seeds: 1}", "advantages.group=seed_step"], "K >= 2"),
    (["sampling.plan={name: trunk_branches, K: 1, seeds: 2}", "advantages.group=seed_step"], "K >= 2"),
])
def test_branch_groups_of_one_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _check(TEMPFLOW, *overrides)
    # the prompt's seeds pooled per step make groups of two again
    _check(TEMPFLOW, "sampling.plan={name: trunk_branches, K: 1, seeds: 2}", "advantages.group=step")


def test_copies_of_one_ode_sample_are_refused():
    """NFT samples by ODE: with shared noise, a prompt's G images are one image, whose rewards cannot differ."""
    with pytest.raises(ConfigError, match="copies of one sample.*shared_noise: false"):
        _check(NFT, "sampling.plan={name: flat, G: 8, shared_noise: true}")
    _check(NFT)


def test_the_cli_says_it_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(SMOKE), "--set", f"run.output_dir={out}", "--set", "sampling.plan={name: flat, G: 1}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampling.plan" in err[0] and "every advantage 0" in err[0], err
    assert not out.exists()


# -- LoRA that does not fit ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory):
    """A real LoRA of the tiny SD3 (rank 4, the family's default targets), saved the way training saves it."""
    from flowrl.models import load_pipeline

    pipe = load_pipeline("tiny:sd3")
    config = add_lora(pipe.transformer, "sd3", 4, 4, None)
    folder = tmp_path_factory.mktemp("sd3_lora")
    save_lora(pipe, pipe.transformer, "sd3", config, folder)
    return folder


def _edited(src: Path, dst: Path, edit) -> Path:
    state = load_file(str(src / LORA_FILE))
    dst.mkdir()
    save_file(edit(dict(state)), str(dst / LORA_FILE))
    return dst


def _sample_error(capsys, lora: Path, tmp_path: Path) -> str:
    code = main(["sample", *TINY, "--prompt", "x", "--lora", str(lora), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert not (tmp_path / "o").exists()
    return err[0]


def test_a_fitting_lora_passes(sd3_lora):
    from flowrl.models import load_pipeline

    check_lora_fits(load_pipeline("tiny:sd3"), sd3_lora)


def test_a_lora_of_another_width_names_the_module_and_both_shapes(sd3_lora, tmp_path, capsys):
    key = sorted(k for k in load_file(str(sd3_lora / LORA_FILE)) if k.endswith("lora_A.weight"))[0]
    module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")

    def widen(state):
        a = state[key]
        state[key] = torch.zeros(a.shape[0], a.shape[1] + 8)
        return state

    line = _sample_error(capsys, _edited(sd3_lora, tmp_path / "wide", widen), tmp_path)
    rank, inputs = load_file(str(sd3_lora / LORA_FILE))[key].shape
    assert f"{module}.lora_A has shape ({rank}, {inputs + 8})" in line
    assert "weight has shape (" in line and f"{inputs + 8} against {inputs} inputs" in line


def test_a_lora_for_a_module_the_model_lacks_is_named(sd3_lora, tmp_path, capsys):
    def rename(state):
        key = sorted(state)[0]
        state[key.replace(".attn.", ".attn_missing.")] = state.pop(key)
        return state

    line = _sample_error(capsys, _edited(sd3_lora, tmp_path / "renamed", rename), tmp_path)
    assert "attn_missing" in line and "does not have" in line


def test_a_lora_trained_on_another_family_fails_in_one_line(tmp_path, capsys):
    from flowrl.models import load_pipeline

    pipe = load_pipeline("tiny:flux")
    save_lora(pipe, pipe.transformer, "flux", add_lora(pipe.transformer, "flux", 4, 4, None), tmp_path / "flux")
    line = _sample_error(capsys, tmp_path / "flux", tmp_path)
    assert line.startswith("flowrl: --lora") or "--lora" in line
    assert "another model" in line


def test_resuming_into_an_adapter_of_another_rank_names_the_key_and_both_shapes(sd3_lora):
    from flowrl.models import load_pipeline

    pipe = load_pipeline("tiny:sd3")
    add_lora(pipe.transformer, "sd3", 8, 8, None)
    with pytest.raises(ValueError, match=r"has shape \(4, \d+\) in the file but \(8, \d+\) in the adapter"):
        load_lora(pipe.transformer, "sd3", sd3_lora)
