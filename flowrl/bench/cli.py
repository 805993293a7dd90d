"""``flowrl bench geneval | ocr | rewards``: the command line of flowrl.bench.run."""
from __future__ import annotations

from flowrl.bench.protocols import BENCHMARKS


def _bench(args) -> None:
    from flowrl.bench.run import run_bench

    run_bench(args)


def add_bench_parser(sub, sampling_options, sampler_settings) -> None:
    b = sub.add_parser("bench", help="a published benchmark (geneval, ocr, rewards): images drawn into GenEval's "
                       "folder layout (resumable, split over `accelerate launch` processes), scored, tables saved")
    b.add_argument("benchmark", choices=sorted(BENCHMARKS))
    sampling_options(b)
    b.add_argument("--prompts", default=None, help="another prompt set in the benchmark's format (default: "
                   + "; ".join(f"{n}: {bm.prompts}" for n, bm in BENCHMARKS.items()) + ")")
    b.add_argument("--num", type=int, default=None, help="images per prompt (default: the benchmark's, "
                   + ", ".join(f"{n} {bm.images_per_prompt}" for n, bm in BENCHMARKS.items()) + ")")
    b.add_argument("--limit", type=int, default=0, help="the first N prompts only (0: all)")
    b.add_argument("--rewards", default=None, help="reward spec scoring the images, e.g. hpsv21,pickscore,"
                   "imagereward (rewards); shapes (geneval on shapes-world metadata)")
    b.add_argument("--reward-kwargs", default=None, help='JSON: {"reward_name": {"arg": value}}')
    b.add_argument("--server", default=None, metavar="URL", help="the benchmark's scorer behind rewards.server "
                   "(geneval: GenEvalScorer; ocr: OcrScorer), e.g. http://127.0.0.1:18085")
    b.add_argument("--no-score", action="store_true", help="only draw the images (e.g. for GenEval's own "
                   "evaluate_images.py)")
    b.add_argument("--baseline", default=None, metavar="DIR", help="an earlier bench's --out on the same prompts, "
                   "samples and seeds: also the paired gain per category, standard errors clustered by prompt")
    b.add_argument("--baseline-differs", nargs="+", default=None, choices=sampler_settings, metavar="SETTING",
                   help="sampler settings this run changes on purpose against --baseline")
    b.set_defaults(fn=_bench, noise_level=0.0)
