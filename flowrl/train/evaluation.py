"""In-run evaluation: ODE samples of eval prompts with the eval weights (EMA, merged), scored by the run's
rewards, and the before / after grid of the same prompts and seeds."""
from __future__ import annotations

import torch

from flowrl.sampling import Constant, Flat, rollout
from flowrl.train import builders
from flowrl.train.images import load_grid, save_grid

GRID_IMAGES = 32
BEFORE_AFTER = 8  # eval prompts in the before / after grid
LOOK_CELL = 128   # px: grids meant for people (eval, before / after) enlarge smaller images to this


def spread(n: int, total: int) -> list[int]:
    """n indices evenly spaced over a prompt file of ``total``: prompt files are often grouped by task (GenEval's
    metadata, the shapes world), and the first n prompts would all be of one or two tasks."""
    n = min(n, total)
    return [i * total // n for i in range(n)]


class Evaluator:
    def __init__(self, cfg, acc, policy, kernel, views, eval_set, decode, score, warn, run_dir):
        self.cfg, self.acc, self.policy, self.kernel, self.views = cfg, acc, policy, kernel, views
        self.eval_set, self.decode, self.score, self.warn, self.run_dir = eval_set, decode, score, warn, run_dir
        self.before = None

    @torch.no_grad()
    def images(self, indices: list[int]) -> torch.Tensor:
        """ODE samples (one per prompt, the eval seed) of the given eval prompts with the eval weights."""
        c = self.cfg
        images = None
        if self.policy.needs_image:
            images = builders.prompt_images([self.eval_set.metadata[i] for i in indices], "data.eval_prompts")
        with self.views.use("eval"), self.acc.autocast():
            guidance = c.sampling.guidance_scale if c.eval.guidance_scale is None else c.eval.guidance_scale
            forest = rollout(self.policy, [self.eval_set.prompts[i] for i in indices], plan=Flat(1),
                             kernel=self.kernel, schedule=Constant(0.0),
                             num_steps=c.eval.num_steps or c.sampling.num_steps, guidance_scale=guidance,
                             height=c.model.height, width=c.model.width, seed=c.eval.seed, prompt_ids=indices,
                             negative_prompt=c.sampling.negative_prompt, max_batch=c.sampling.max_batch,
                             images=images)
            return self.decode(forest.latents[forest.leaves()])

    @torch.no_grad()
    def evaluate(self, it: int) -> dict:
        """eval.num_prompts eval prompts spread over the file, shared over processes, sampled and scored."""
        acc = self.acc
        chosen = spread(self.cfg.eval.num_prompts, len(self.eval_set))
        mine = chosen[acc.process_index::acc.num_processes]
        images = self.images(mine)
        # one sample per prompt, so one group each (a pairwise reward scores 1/2 here: nothing to compare)
        scores, bad = self.score(images, [self.eval_set.prompts[i] for i in mine],
                                 [self.eval_set.metadata[i] for i in mine], mine, groups=torch.arange(len(mine)))
        if scores is None:
            self.warn(f"iteration {it}: eval scores are non-finite for eval prompt ids {bad}; no eval row")
            return {}
        row = {}
        for k, v in scores.items():   # main scores pick the best checkpoint; extras (e.g. shapes/correct) are logged
            row[f"eval/{k}_mean"] = float(acc.gather_for_metrics(v.to(acc.device)).mean())
        if acc.is_main_process:  # a look, not an archive: the first images of the main process
            save_grid(images[:GRID_IMAGES], self.run_dir / "samples" / f"eval_{it:06d}.png", min_cell=LOOK_CELL)
        return row

    def begin(self, start: int) -> None:
        """The 'before' row of the before / after grid: sampled at a run's start, read back when resuming."""
        if self.eval_set is None or not self.acc.is_main_process:
            return
        before = self.run_dir / "samples" / "before.png"
        n = min(BEFORE_AFTER, len(self.eval_set))
        if start == 0:
            self.before = self.images(spread(n, len(self.eval_set)))
            save_grid(self.before, before, cols=n)
        elif before.is_file() or before.with_suffix(".gif").is_file():  # a video model's grid is a GIF
            self.before = load_grid(before if before.is_file() else before.with_suffix(".gif"), n)

    def before_after(self) -> None:
        """The same prompts and seeds before and after training, one row each. Main process only."""
        if self.before is None:
            return
        after = self.images(spread(len(self.before), len(self.eval_set)))
        # a resumed run reads "before" back from its PNG, on the CPU
        save_grid(torch.cat([self.before.cpu(), after.cpu()]), self.run_dir / "samples" / "before_after.png",
                  cols=len(self.before), min_cell=LOOK_CELL)
