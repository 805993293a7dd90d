"""Methods as named parts: the loop names no method, every registered combination a recipe can name trains, the
micro-batcher keeps chunks whole, recorded means re-score bit for bit, DanceGRPO's best / worst selection, and
flowrl with flow_grpo's parity keys reproduces flow_grpo's own loss and gradient on one stored micro-batch."""
import copy
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from flowrl.core import ADVANTAGE_ESTIMATORS, AGGREGATION_WEIGHTS, KL_FORMS, POLICY_LOSSES, ratio_norm_log_ratio
from flowrl.sampling import score_edges
from flowrl.train.config import ConfigError, load_config
from flowrl.train.credit import CREDIT
from flowrl.train.objectives import OBJECTIVES
from flowrl.train.objectives.grpo import CHUNKINGS, STEP_WEIGHTS, extremes
from flowrl.train.units import Units, aggregation, micro_batches
from flowrl.train.validate import validate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "tiny_smoke.yaml")
SMALL = ["run.progress=false", "eval.every=0", "data.prompts_per_iteration=2", "sampling.plan={name: flat, G: 4}",
         "sampling.num_steps=6", "sampling.schedule={name: window, size: 4, start: 0}", "training.micro_batch_size=5"]


def test_the_loop_names_no_method():
    source = (ROOT / "flowrl" / "train" / "trainer.py").read_text()
    assert len(source.splitlines()) < 300
    names = set(OBJECTIVES) | set(POLICY_LOSSES) | set(KL_FORMS) | set(CREDIT) | set(ADVANTAGE_ESTIMATORS)
    names |= {"flow_grpo", "dance", "chunk", "guard", "mixgrpo", "branch", "tree", "flat", "split_at", "flux", "sd3",
              "ratio_norm", "window", "sde"}
    code = re.sub(r'"""[\s\S]*?"""|#[^\n]*', "", source).lower()  # docstrings and comments aside
    found = sorted(n for n in names if re.search(rf"\b{re.escape(n.lower())}\b", code))
    assert not found, f"the loop names {found}"


def _trainer(tmp_path, *extra):
    from flowrl.train.trainer import Trainer

    return Trainer(load_config(RECIPE, [f"run.output_dir={tmp_path / 'run'}", *SMALL, *extra]))


def _swap(trainer, sets):
    """The same model under another recipe's method keys: a fresh objective and scorer from the new config."""
    trainer.base_cfg = getattr(trainer, "base_cfg", trainer.cfg)
    cfg = copy.deepcopy(trainer.base_cfg)
    for key, value in sets.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    trainer.cfg = trainer.scorer.cfg = trainer.evaluator.cfg = cfg
    trainer.objective = OBJECTIVES[cfg.training.objective](cfg, trainer.policy, trainer.views)


def _combinations():
    """Every entry of every registry a recipe names at least once, the loss-shaping ones in full product."""
    # the losses built for image steps in full product; the token ones image steps can take (cispo) once per
    # aggregation; sequence-level ones (gspo, gmpo) are refused on images (test_a_plan_...)
    grpo = list(itertools.product(("clip", "ratio_norm"), [None, *KL_FORMS], AGGREGATION_WEIGHTS))
    grpo += [("cispo", None, agg) for agg in AGGREGATION_WEIGHTS]
    assert {n for n, f in POLICY_LOSSES.items() if not f.sequence_level} == {"clip", "ratio_norm", "cispo"}
    chunks = [None, {"name": "fixed", "sizes": [1, 3]}, {"name": "uniform", "size": 2}, {"name": "adaptive"}]
    out = []
    for i, (loss, kl, agg) in enumerate(grpo):
        out.append({"training.objective": "grpo", "training.policy_loss": loss, "training.kl": kl,
                    "training.kl_beta": 0.1 if kl else 0.0, "training.aggregation": agg,
                    "advantages.estimator": list(ADVANTAGE_ESTIMATORS)[i % len(ADVANTAGE_ESTIMATORS)],
                    "training.step_weights": STEP_WEIGHTS[i % len(STEP_WEIGHTS)],
                    "training.chunks": chunks[i % len(chunks)], "training.timestep_fraction": 0.5 if i % 2 else 1.0,
                    "training.keep_extremes": 2 if i % 5 == 0 else 0, "training.drop_zero_advantage": i % 3 == 0,
                    "training.cfg_detach_uncond": i % 2 == 1})
    for agg, beta in itertools.product(AGGREGATION_WEIGHTS, (0.0, 0.1)):
        out.append({"training.objective": "nft", "training.aggregation": agg, "training.kl_beta": beta,
                    "advantages.estimator": "flow_grpo"})
    assert {c["training.chunks"]["name"] for c in out if c.get("training.chunks")} == set(CHUNKINGS)
    return out


def test_every_registered_combination_trains_two_iterations(tmp_path):
    trainer = _trainer(tmp_path, "sampling.guidance_scale=2.0")
    for it, sets in enumerate(_combinations()):
        _swap(trainer, sets)
        for j in range(2):
            row = trainer.iteration(2 * it + j)
            assert "skipped" not in row and math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), (sets, row)
            if sets.get("training.kl_beta"):
                assert math.isfinite(row["kl"]), sets
    trainer.acc.end_training()


def test_a_plan_the_objective_cannot_train_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"sampling.plan: split_at cannot be trained by training.objective grpo "
                                          r"with advantages.credit broadcast"):
        load_config(RECIPE, ["sampling.plan={name: split_at, steps: [1], K: 2}", "sampling.schedule={name: constant}"])
    for bad, needle in (("training.policy_loss=ppo", "training.policy_loss"), ("training.kl=k9", "training.kl"),
                        ("training.chunks={name: fixed, sizes: [2, 2]}", "training.chunks"),
                        ("training.aggregation=sum", "training.aggregation"),
                        ("advantages.estimator=gae", "advantages.estimator"), ("advantages.std=group", "estimator"),
                        ("training.policy_loss=gspo", "use training.chunks"),
                        ("training.keep_extremes=3", "keep_extremes")):
        with pytest.raises(ConfigError, match=needle):
            load_config(RECIPE, [bad])
    with pytest.raises(ConfigError, match="training.chunks"):  # nft has no log-prob ratio to chunk
        load_config(RECIPE, ["training.objective=nft", "training.chunks={name: uniform, size: 2}"])


def _units(lengths, trajectories=3):
    """Units of ``trajectories`` chains whose steps are cut into chunks of ``lengths``."""
    n = sum(lengths)
    chunk = torch.cat([torch.full((k,), i) for i, k in enumerate(lengths)])
    chunk = torch.cat([chunk + t * len(lengths) for t in range(trajectories)])
    sample = torch.arange(trajectories).repeat_interleave(n)
    z = torch.zeros(len(chunk), dtype=torch.long)
    return Units.make(sample=sample, prompt=z, group=z, tree=sample, edge=torch.arange(len(chunk)),
                      step=torch.arange(n).repeat(trajectories), adv=torch.zeros(len(chunk)), chunk=chunk, block=chunk)


@pytest.mark.parametrize("size,updates", [(3, 1), (5, 2), (6, 1), (4, 3)])
def test_micro_batches_never_split_a_chunk(size, updates):
    units = _units([2, 3, 4, 7])
    for epoch in range(3):
        out = micro_batches(units, updates, size, 0, 5, epoch, 0)
        assert len(out) == updates
        ids = torch.cat([mb for batches in out for mb in batches])
        assert sorted(ids.tolist()) == list(range(len(units)))  # every unit once
        for batches in out:
            for mb in batches:
                chunks = units.chunk[mb].unique()
                whole = torch.isin(units.chunk, chunks).sum()
                assert whole == len(mb)  # all of every chunk it touches
                assert len(mb) <= size or len(chunks) == 1  # over the size only for one chunk longer than it


def test_singleton_blocks_are_the_plain_shuffle_and_split():
    from flowrl.sampling.seeding import derive_seed

    units = _units([1] * 10, trajectories=2)
    units.block = torch.arange(len(units))
    g = torch.Generator().manual_seed(derive_seed(0, 3, 1, 0, "shuffle"))
    order = torch.randperm(len(units), generator=g)
    want = [list(torch.split(u, 6)) for u in torch.tensor_split(order, 2)]
    got = micro_batches(units, 2, 6, 0, 3, 1, 0)
    assert [[b.tolist() for b in u] for u in got] == [[b.tolist() for b in u] for u in want]


def test_aggregation_leaves_dropped_units_out_of_the_denominator():
    units = _units([2, 2], trajectories=2)
    units.keep = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 1])
    w, denom = aggregation(units, torch.arange(8), "token-mean")
    assert w.tolist() == units.keep.tolist() and denom == 5
    w, denom = aggregation(units, torch.arange(8), "seq-mean-token-mean")
    assert w.tolist() == pytest.approx([1 / 3, 0, 1 / 3, 1 / 3, 0, 0, 1 / 2, 1 / 2]) and denom == 2


def test_chunk_units_in_training_micro_batches_are_whole(tmp_path):
    """A GCPO run with micro-batch sizes that do not divide the chunk lengths: every loss call sees whole chunks."""
    trainer = _trainer(tmp_path, "training.chunks={name: fixed, sizes: [1, 3]}", "training.micro_batch_size=5")
    seen, real = [], trainer.objective.loss

    def spy(forest, units, mb):
        seen.append(bool((torch.isin(units.chunk, units.chunk[mb].unique()).sum() == len(mb))))
        return real(forest, units, mb)

    trainer.objective.loss = spy
    row = trainer.iteration(0)
    assert seen and all(seen) and "skipped" not in row
    trainer.acc.end_training()


def test_recorded_means_rescore_bit_for_bit_and_ratio_norm_starts_at_zero(tmp_path):
    """GRPO-Guard's rollout records each step's kernel mean; re-scoring the stored steps under the same weights, in
    the rollout's own batches (one step of every trajectory), gives the same means and log-probs bit for bit and a
    normalised log-ratio of exactly 0; in shuffled micro-batches of mixed steps, to float rounding (the
    transformer's matmuls round differently with the batch's shape)."""
    trainer = _trainer(tmp_path, "training.policy_loss=ratio_norm", "training.step_weights=inverse_dt",
                       "sampling.guidance_scale=2.0")
    assert trainer.objective.record == ("mean",)
    forest = trainer._rollout(trainer.train_set.prompts[:2], [0, 1], 0)
    edges = forest.trainable_edges()
    for k in forest.edge_step[edges].unique():
        mb = edges[forest.edge_step[edges] == k]
        with torch.no_grad():
            logp, mean, std = score_edges(trainer.policy, forest, mb)
        assert torch.equal(mean, forest.mean[mb]) and torch.equal(logp, forest.logp_old[mb])
        assert torch.equal(ratio_norm_log_ratio(logp, forest.logp_old[mb], mean, forest.mean[mb], std),
                           torch.zeros(len(mb)))
    for mb in torch.split(edges[torch.randperm(len(edges), generator=torch.Generator().manual_seed(1))], 3):
        with torch.no_grad():
            logp, mean, std = score_edges(trainer.policy, forest, mb)
        torch.testing.assert_close(mean, forest.mean[mb], rtol=0, atol=1e-5)
        assert float(ratio_norm_log_ratio(logp, forest.logp_old[mb], mean, forest.mean[mb], std).abs().max()) < 1e-6
    trainer.acc.end_training()


def test_keep_extremes_trains_the_best_and_worst_of_each_group():
    adv = torch.tensor([0.3, -1.0, 2.0, 0.1, 0.5, -0.2, 1.5, -3.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert torch.nonzero(extremes(adv, group, 2)).flatten().tolist() == [1, 2, 6, 7]
    assert torch.nonzero(extremes(adv, group, 4)).flatten().tolist() == list(range(8))


def test_dancegrpo_units_come_from_the_extremes_with_the_timestep_fraction(tmp_path):
    trainer = _trainer(tmp_path, "training.keep_extremes=2", "training.timestep_fraction=0.5",
                       "sampling.kernel={name: flow_sde_const, eta: 0.3}", "sampling.plan={name: flat, G: 4, "
                       "shared_noise: true}")
    forest = trainer._rollout(trainer.train_set.prompts[:2], [0, 1], 0)
    leaves = forest.leaves()
    adv = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.3, -0.2, 1.0, -2.0])
    units = trainer.objective.units(forest, adv, forest.node_prompt[leaves], 0)
    assert sorted(units.sample.unique().tolist()) == [1, 2, 6, 7]
    assert torch.bincount(units.sample, minlength=8)[[1, 2, 6, 7]].tolist() == [2] * 4  # ceil(0.5 * 4) steps each
    roots = forest.latents[forest.node_step == 0]
    assert torch.equal(roots[0], roots[3]) and not torch.equal(roots[0], roots[4])  # one noise per prompt group
    trainer.acc.end_training()


def test_flow_grpo_parity_on_one_stored_micro_batch(tmp_path):
    """flow_grpo's loss and gradient, written out from its reference formulas (SDE step with the unconditional
    branch detached, samples of zero advantage dropped, policy loss and KL as batch means, the KL over g^2), equal
    flowrl's with the parity keys on the same stored micro-batch."""
    a, eps, beta, gs = 0.7, 1e-3, 0.04, 4.5
    trainer = _trainer(tmp_path, f"sampling.guidance_scale={gs}", "training.cfg_detach_uncond=true",
                       "training.drop_zero_advantage=true", "training.kl=flow_grpo", f"training.kl_beta={beta}",
                       f"training.clip_eps_low={eps}", "sampling.kernel={name: flow_sde, a: 0.7}")
    policy, obj = trainer.policy, trainer.objective
    forest = trainer._rollout(trainer.train_set.prompts[:2], [0, 1], 0)
    leaves = forest.leaves()
    adv = torch.tensor([0.8, 0.0, -1.2, 0.4, 0.0, 1.5, -0.6, 0.0])
    units = obj.units(forest, adv, forest.node_prompt[leaves], 0)
    with torch.no_grad():  # move the LoRA off its start so ratios and the KL are not trivial
        for i, p in enumerate(trainer.params):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    mb = torch.arange(len(units))

    def grads():
        g = [p.grad.clone() for p in trainer.params]
        for p in trainer.params:
            p.grad = None
        return g

    with trainer.views.use("train"):
        loss, _ = obj.loss(forest, units, mb)
        w, denom = aggregation(units, mb, "token-mean")
        ours = (loss * w.to(loss)).sum() / denom
        ours.backward()
    g_ours = grads()

    # flow_grpo, from its formulas
    denoiser = trainer.acc.unwrap_model(trainer.model)
    e = units.edge[units.adv != 0]
    x, x_next = forest.latents[forest.src[e]], forest.latents[forest.dst[e]]
    k = forest.edge_step[e]
    sigma, sigma_next = forest.grid.sigmas[k], forest.grid.sigmas[k + 1]
    rows = policy.rows(forest.cond, forest.node_prompt[forest.src[e]], gs)

    def velocity():
        out = policy.forward(torch.cat([x, x]), torch.cat([forest.grid.timesteps[k]] * 2), rows, forest.cond.shared,
                             gs).float()
        u, c = out.chunk(2)
        return u.detach() + gs * (c - u.detach())

    def step_mean(v):
        s, dt = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
        denom = torch.where(s >= 1, forest.grid.sigmas[1], s)
        std_dev_t = a * torch.sqrt(s / (1 - denom))
        mean = x * (1 + std_dev_t ** 2 / (2 * s) * dt) + v * (1 + std_dev_t ** 2 * (1 - s) / (2 * s)) * dt
        return mean, std_dev_t, dt

    mean, std_dev_t, dt = step_mean(velocity())
    scale = std_dev_t * torch.sqrt(-dt)
    log_prob = (-((x_next - mean) ** 2) / (2 * scale ** 2) - torch.log(scale)
                - torch.log(torch.sqrt(torch.as_tensor(2 * torch.pi)))).mean(dim=(1, 2, 3))
    with torch.no_grad():
        denoiser.disable_adapters()
        mean_ref = step_mean(velocity())[0]
        denoiser.enable_adapters()
    A = units.adv[units.adv != 0]
    ratio = torch.exp(log_prob - forest.logp_old[e])
    policy_loss = torch.mean(torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - eps, 1 + eps)))
    kl_loss = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t.flatten() ** 2)).mean()
    theirs = policy_loss + beta * kl_loss
    theirs.backward()
    g_theirs = grads()
    assert len(e) < len(units) and float(kl_loss.detach()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for go, gt in zip(g_ours, g_theirs):
        torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-8)
    trainer.acc.end_training()
