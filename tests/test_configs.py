"""The shipped recipes (configs/*.yaml) and accelerate launch configs (configs/accelerate/*.yaml).

Recipes must pass the schema, validate in full once their model and rewards are swapped for offline stand-ins
(prompt files exist, kernel / schedule / plan build and fit the step count), name only known rewards, and keep
their train and eval prompts apart. The overrides their comments suggest must validate too. Launch configs must
parse as accelerate's own ClusterConfig, use only real keys, and pass accelerate's launch-argument checks. The
FSDP ones must wrap block classes that exist in the model they are meant for.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import rewards
from flowrl.train import builders
from flowrl.train.config import Config, ConfigError, build_dataclass, load_config

REPO = Path(__file__).resolve().parents[1]
# image recipes; the language-model ones (trainer: llm) are tests/test_llm_configs.py's
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml")
                 if (yaml.safe_load(p.read_text()) or {}).get("trainer", "image") == "image")
LAUNCH_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
PROMPTS = REPO / "flowrl" / "data" / "prompts"

# Training sets flowrl does not ship. Only the test splits are in the package, and training on them would leak.
# recipe -> (the path the recipe names, a shipped file of the same format that stands in for validation)
# recipe value (relative to configs/), the stand-in tests train on instead (a shipped set)
USER_PROVIDED_TRAIN = {
    "sd3_flowgrpo_geneval.yaml": ("../data/geneval/train_metadata.jsonl", "prompts:geneval_test_metadata"),
    "sd3_flowgrpo_ocr.yaml": ("../data/ocr/train.txt", "prompts:ocr_test"),
    "sd3_grpo_guard_geneval.yaml": ("../data/geneval/train_metadata.jsonl", "prompts:geneval_test_metadata"),
    "sd3_tempflow_geneval.yaml": ("../data/geneval/train_metadata.jsonl", "prompts:geneval_test_metadata"),
    "flux_kontext_flowgrpo_counting.yaml": ("../data/counting_edit/train.jsonl", "prompts:tiny_edit"),
    "wan_flowgrpo_ocr.yaml": ("../data/ocr/train.txt", "prompts:ocr_test"),
    "qwen_image_edit_flowgrpo_counting.yaml": ("../data/counting_edit/train.jsonl", "prompts:tiny_edit"),
}

EXPECTED_RECIPES = {"tiny_smoke.yaml", "sd3_flowgrpo_pickscore.yaml", "sd3_flowgrpo_geneval.yaml",
                    "sd3_flowgrpo_ocr.yaml", "sd3_flowgrpo_fast_pickscore.yaml", "flux_flowgrpo_pickscore.yaml",
                    "flux_gcpo_hpsv21.yaml", "sd3_gcpo_pickscore.yaml", "sd3_grpo_guard_geneval.yaml",
                    "flux_grpo_guard_pickscore.yaml", "flux_dancegrpo_hpsv21.yaml", "sd3_dancegrpo_hpsv21.yaml",
                    "flux_branchgrpo_hpsv21.yaml", "flux_branchgrpo_widpru_hpsv21.yaml",
                    "flux_branchgrpo_deppru_hpsv21.yaml", "flux_branchgrpo_mix_hpsv21.yaml",
                    "sd3_treegrpo_hpsv21.yaml", "sd3_treegrpo_hps_clip.yaml", "sd3_tempflow_pickscore.yaml",
                    "sd3_tempflow_geneval.yaml", "toy_branchgrpo.yaml", "toy_treegrpo.yaml", "toy_tempflow.yaml"}
EXPECTED_LAUNCH = {"single_gpu.yaml", "multi_gpu.yaml", "multi_node.yaml", "deepspeed_zero2.yaml", "fsdp.yaml",
                   "fsdp_flux.yaml"}

# accelerate launch configs for FSDP -> the model family whose transformer they wrap
FSDP_FAMILY = {"fsdp.yaml": "sd3", "fsdp_flux.yaml": "flux"}

_SET = re.compile(r'--set\s+(?:"([^"]+)"|([^\s`"]+))')


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _family(raw: dict) -> str:
    path = raw.get("model", {}).get("path", "tiny:sd3")
    if path.startswith("tiny:"):
        return path.split(":", 1)[1]
    return hub_family(path)


# a hub id's family, by the first of these its name contains (the recipes name hub ids, not cached here)
HUB_FAMILIES = (("kontext", "flux_kontext"), ("flux", "flux"), ("qwen-image-edit", "qwen_image_edit"),
                ("qwen-image", "qwen_image"), ("wan", "wan"), ("xl", "sdxl"), ("stable-diffusion-v1", "sd"))


def hub_family(path: str) -> str:
    return next((fam for key, fam in HUB_FAMILIES if key in path.lower()), "sd3")


def _standins(path: Path) -> list[str]:
    """Overrides that make a recipe validate offline: tiny model, a registered reward, stand-in train prompts."""
    raw = _raw(path)
    out = [f"model.path=tiny:{_family(raw)}", "rewards.components=brightness:1", "rewards.kwargs={}"]
    if path.name in USER_PROVIDED_TRAIN:
        out.append(f"data.train_prompts={USER_PROVIDED_TRAIN[path.name][1]}")
    return out


def _reward_names(spec) -> list[str]:
    """The names in a rewards.components spec, without the registry check parse_reward_spec does."""
    if isinstance(spec, dict):
        return list(spec)
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    return [str(e).strip().partition(":")[0].strip() for e in entries]


def _documented_overrides(path: Path) -> list[str]:
    comments = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    return [quoted or bare for quoted, bare in _SET.findall(comments)]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipe paths are relative to the repository root


def test_expected_files_present():
    assert EXPECTED_RECIPES <= {p.name for p in RECIPES}
    assert EXPECTED_LAUNCH <= {p.name for p in LAUNCH_CONFIGS}


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_schema(path):
    """Every key is a real field with the right type (no overrides, no file or registry checks)."""
    cfg = build_dataclass(Config, _raw(path))
    assert cfg.sampling.kernel.get("name") and cfg.sampling.schedule.get("name") and cfg.sampling.plan.get("name")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_with_offline_standins(path, in_repo):
    cfg = load_config(path, _standins(path))
    assert builders.load_prompts(cfg.data.train_prompts)
    if cfg.eval.every:
        assert cfg.data.eval_prompts


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_rewards_are_known(path):
    names = _reward_names(_raw(path)["rewards"]["components"])
    assert names
    unknown = [n for n in names if n not in rewards.REWARDS]
    assert not unknown, f"{path.name}: unknown reward(s) {unknown} (registered: {sorted(rewards.REWARDS)})"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_documented_overrides_validate(path, in_repo):
    """Each `--set` a recipe's comments suggest applies on its own, and the result still validates."""
    for override in _documented_overrides(path):
        if "path/to/" in override:  # a placeholder for the user's own file
            continue
        load_config(path, _standins(path) + [override])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_train_and_eval_prompts_are_disjoint(path, in_repo):
    cfg = load_config(path, _standins(path))
    if not cfg.data.eval_prompts or path.name in USER_PROVIDED_TRAIN:
        return
    train = set(builders.load_prompts(cfg.data.train_prompts).prompts)
    evals = set(builders.load_prompts(cfg.data.eval_prompts, "data.eval_prompts").prompts)
    assert not train & evals, f"{path.name}: {len(train & evals)} eval prompts are also training prompts"
    assert cfg.eval.num_prompts <= len(builders.load_prompts(cfg.data.eval_prompts, "data.eval_prompts"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_window_fits_every_draw(path):
    """Validation draws the window of iteration 0 only; the whole start range must fit the step count."""
    raw = _raw(path)
    sched, steps = raw["sampling"]["schedule"], raw["sampling"]["num_steps"]
    if sched["name"] == "window" and isinstance(sched.get("start"), list):
        assert sched["start"][1] + sched["size"] <= steps


@pytest.mark.parametrize("name", sorted(USER_PROVIDED_TRAIN))
def test_user_provided_train_sets_fail_clearly(name, in_repo):
    """GenEval / OCR train on a file the user provides, never silently on the shipped test split."""
    path = REPO / "configs" / name
    expected, _ = USER_PROVIDED_TRAIN[name]
    raw = _raw(path)
    assert raw["data"]["train_prompts"] == expected
    assert not expected.startswith("prompts:")  # not shipped in the package
    assert raw["data"]["train_prompts"] != raw["data"]["eval_prompts"]
    if (REPO / "configs" / expected).exists():
        pytest.skip(f"{expected} is present here")
    with pytest.raises(ConfigError, match="data.train_prompts"):
        load_config(path, _standins(path)[:2])


@pytest.mark.parametrize("path", [p for p in RECIPES if _raw(p)["finetune"].get("lora_target_modules")],
                         ids=lambda p: p.name)
def test_lora_targets_exist_in_model(path):
    """Every LoRA target names a module of the family's transformer (peft's suffix match), not just some of them."""
    from flowrl.models.tiny import build_tiny

    raw = _raw(path)
    from flowrl.models import FAMILIES

    family = _family(raw)
    names = [n for n, _ in getattr(build_tiny(family, seed=0), FAMILIES[family].component).named_modules()]
    for target in raw["finetune"]["lora_target_modules"]:
        assert any(n == target or n.endswith("." + target) for n in names), f"{path.name}: {target} matches nothing"


def test_every_shipped_prompt_file_has_provenance():
    provenance = (PROMPTS / "PROVENANCE.md").read_text()
    for f in PROMPTS.iterdir():
        if f.suffix in (".txt", ".jsonl"):
            assert f"`{f.name}`" in provenance, f"{f.name} is not described in PROVENANCE.md"


# ------------------------------------------------------------------------------------------- launch configs


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "flowrl.cli", "train", "x.yaml"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_launch_config_keys_are_real(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    raw = _raw(path)
    fields = set(ClusterConfig.__dataclass_fields__)
    assert set(raw) <= fields, f"{path.name}: unknown keys {sorted(set(raw) - fields)}"
    ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: enum values, unknown keys
    # nested sections become `accelerate launch` arguments (fsdp_config.x -> --fsdp_x)
    dests = {a.dest for a in launch_command_parser()._actions}
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "fsdp_")):
        for key in raw.get(section) or {}:
            arg = key if key.startswith(prefix) else prefix + key
            assert arg in dests, f"{path.name}: {section}.{key} is not an accelerate launch option"


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_launch_config_passes_launch_checks(path):
    args = _launch_args(path)
    raw = _raw(path)
    assert args.num_processes == raw["num_processes"]


@pytest.mark.parametrize("name", sorted(FSDP_FAMILY))
def test_fsdp_wraps_the_family_blocks(name, monkeypatch):
    """The block classes named for FSDP exist in that family's transformer (accelerate raises otherwise) and each
    block becomes one FSDP unit; the other family's transformer is refused, hence one file per family."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    from flowrl.models.tiny import build_tiny

    env = prepare_multi_gpu_env(_launch_args(REPO / "configs" / "accelerate" / name))
    for key, value in env.items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    family = FSDP_FAMILY[name]
    model = build_tiny(family, seed=0).transformer
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {type(m).__name__ for m in model.modules() if wrap(m)}
    assert wrapped == set(plugin.transformer_cls_names_to_wrap) == set(type(model)._no_split_modules)
    other = build_tiny("flux" if family == "sd3" else "sd3", seed=0).transformer
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        fsdp2_prepare_auto_wrap_policy(plugin, other)


def test_balance_weights_set_each_category_share(in_repo):
    """data.balance_weights: each tag's total draw probability is its share over the sum of shares (unnamed tags
    1), whatever its prompt count; an unknown tag, a non-positive share or weights without balance_key fail by
    name at load time."""
    from flowrl.train.builders import balance_weights, load_prompts, prompt_indices

    toy = REPO / "configs" / "toy_nft.yaml"
    cfg = load_config(toy, ["data.balance_weights={position: 3.0, colors: 0.5}"])
    meta = load_prompts(cfg.data.train_prompts).metadata
    w = balance_weights(meta, "tag", cfg.data.balance_weights)
    tags = [m["tag"] for m in meta]
    total = {t: float(sum(wi for wi, ti in zip(w, tags) if ti == t) / w.sum()) for t in set(tags)}
    shares = {t: {"position": 3.0, "colors": 0.5}.get(t, 1.0) for t in set(tags)}
    assert total == pytest.approx({t: s / sum(shares.values()) for t, s in shares.items()}, rel=1e-12)
    drawn = [tags[i] for it in range(400) for i in prompt_indices(0, it, len(tags), 8, w)]
    assert drawn.count("position") / len(drawn) == pytest.approx(3.0 / 7.5, abs=0.03)
    assert drawn.count("colors") / len(drawn) == pytest.approx(0.5 / 7.5, abs=0.015)

    for override, match in [("data.balance_weights={positon: 2.0}", "data.balance_weights.positon: no training"),
                            ("data.balance_weights={position: 0}", "data.balance_weights.position: must be a pos"),
                            ("data.balance_key=null", "data.balance_weights: needs data.balance_key")]:
        with pytest.raises(ConfigError, match=match):
            load_config(toy, ["data.balance_weights={position: 2.0}"] * ("key" in override) + [override])


@pytest.mark.parametrize("key,hint", [
    ("max_grad_nrm", " (did you mean 'max_grad_norm'?)"),   # a typo
    ("KL_Beta", " (did you mean 'kl_beta'?)"),              # the case
    ("learning_rate", ""),                                  # nothing close: no guess
])
def test_unknown_key_names_the_closest_field(key, hint):
    with pytest.raises(ConfigError) as err:
        build_dataclass(Config, {"training": {key: 1}})
    assert str(err.value) == f"unknown config key training.{key}{hint}"
