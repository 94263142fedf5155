"""Write your own Matcher, ThresholdPolicy and PairCache, compose them with MergeConfig, apply.

Each of the three parts is a small subclass; nothing else in tokenmerge needs editing:

* `EveryKthDestination` (a Matcher): every k-th token is a destination, every other
  token a source paired with its most similar destination;
* `DepthRamp` (a ThresholdPolicy): merge a share of the tokens that ramps linearly from
  the first merged layer to the last;
* `WarmupThenEvery` (a PairCache): recompute the plans at every step of the first few
  steps, when the latents change fast, then only every k steps.

Run it on a tiny random-weight Stable Diffusion pipeline built in code (nothing is
downloaded):

    python examples/custom_policy.py --tiny

or on a real one (a hub id or a local folder), writing the image:

    python examples/custom_policy.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out astronaut.png
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

import tokenmerge
from tokenmerge.policies import CacheEntry, Matcher, Matching, MergeContext, PairCache, ThresholdPolicy
from tokenmerge.tools.cli import OneLineParser, run_script

# The `--8<--` comments mark the parts that docs/how-to/custom-policy.md shows.


# --8<-- [start:matcher]
class EveryKthDestination(Matcher):
    """Every ``k``-th token is a destination; the others are sources, paired by cosine similarity.

    Args:
        k: one destination in every ``k`` tokens, ``k >= 2``.
    """

    traceable = True  # pure tensor code, shapes fixed by the input: torch.compile traces it inline

    def __init__(self, k: int = 4) -> None:
        if not (isinstance(k, int) and k >= 2):
            raise tokenmerge.TokenMergeError(f"k must be an int >= 2; got {k!r}")
        self.k = k

    @property
    def max_ratio(self) -> float:  # type: ignore[override]
        """All sources can merge: ``1 - 1/k`` of the tokens."""
        return 1.0 - 1.0 / self.k

    def match(self, metric: Tensor, ctx: MergeContext) -> Matching:
        """Match ``metric`` ``(B, N, C)``: positions ``0, k, 2k, ...`` are the destinations."""
        positions = torch.arange(metric.shape[1], device=metric.device)  # (N,)
        is_destination = positions % self.k == 0  # (N,)
        return Matching.by_similarity(metric, positions[~is_destination], positions[is_destination])


# --8<-- [end:matcher]


# --8<-- [start:threshold]
class DepthRamp(ThresholdPolicy):
    """Merge ``first`` of the tokens in the first merged layer, ramping linearly to ``last`` in the last.

    Args:
        first: share of tokens merged in the first layer, in ``[0, 1)``.
        last: share merged in the last layer, in ``[0, 1)``.
    """

    traceable = True  # depends on the layer and the token count only, never on tensor values

    def __init__(self, first: float = 0.5, last: float = 0.25) -> None:
        for name, value in (("first", first), ("last", last)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise tokenmerge.TokenMergeError(f"{name} must be a number in [0, 1); got {value!r}")
        self.first, self.last = float(first), float(last)

    def validate(self, matcher: Matcher) -> None:
        """Reject shares the matcher cannot merge (checked before anything is applied)."""
        most = max(self.first, self.last)
        if most > matcher.max_ratio:
            raise tokenmerge.TokenMergeError(f"first and last must be at most {matcher.max_ratio:g}; got {most:g}")

    def num_merged(self, matching: Matching, ctx: MergeContext) -> int:
        """The ramped share of ``ctx.num_tokens``, at most what the matching allows."""
        position = ctx.layer_index / max(ctx.num_layers - 1, 1)  # 0 at the first layer, 1 at the last
        share = self.first + (self.last - self.first) * position
        return min(int(share * ctx.num_tokens), matching.max_merge)


# --8<-- [end:threshold]


# --8<-- [start:cache]
class WarmupThenEvery(PairCache):
    """Recompute at every one of the first ``warmup`` steps, then every ``k`` steps.

    Args:
        warmup: steps at the start that always recompute.
        k: afterwards, reuse a plan for ``k`` steps.
    """

    def __init__(self, warmup: int = 2, k: int = 3) -> None:
        if not (isinstance(warmup, int) and warmup >= 0 and isinstance(k, int) and k >= 1):
            raise tokenmerge.TokenMergeError(f"warmup must be an int >= 0 and k an int >= 1; got {warmup!r}, {k!r}")
        super().__init__()
        self.warmup, self.k = warmup, k

    def should_recompute(self, entry: CacheEntry, metric: Tensor, ctx: MergeContext) -> bool:
        """True without step information, during the warm-up, and once ``k`` steps have passed."""
        if ctx.step is None or entry.step is None:
            return True
        return ctx.step < self.warmup or ctx.step - entry.step >= self.k


# --8<-- [end:cache]


# --8<-- [start:compose]
def make_config(seed: int = 0) -> tokenmerge.MergeConfig:
    """The three parts composed into one policy."""
    return tokenmerge.MergeConfig(
        matcher=EveryKthDestination(k=4),
        threshold=DepthRamp(first=0.6, last=0.3),
        cache=WarmupThenEvery(warmup=2, k=3),
        seed=seed,
    )


# --8<-- [end:compose]


def _tiny_pipeline(seed: int) -> tuple[object, dict[str, object]]:
    from tokenmerge.tools.tiny import tiny_prompt_embeds, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed)
    return pipe, {"prompt_embeds": tiny_prompt_embeds(seed=seed), "guidance_scale": 1.0}


def _real_pipeline(model: str, prompt: str, device: str) -> tuple[object, dict[str, object]]:
    from diffusers import StableDiffusionPipeline

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    return pipe, {"prompt": prompt}


def run(pipe: object, call_kwargs: dict[str, object], steps: int, seed: int, device: str) -> Tensor:
    """One generation with a fixed noise seed; returns the images ``(B, 3, H, W)`` in [0, 1]."""
    generator = torch.Generator(device).manual_seed(seed)
    return pipe(num_inference_steps=steps, generator=generator, output_type="pt", **call_kwargs).images  # type: ignore[operator]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="a tiny random-weight pipeline built in code")
    source.add_argument("--model", help="a Stable Diffusion 1.x/2.x pipeline: hub id or local folder")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse", help="prompt (--model only)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 6 tiny, 30 real)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of the merging")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the merged image here (PNG)")
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.tiny else 30)

    try:
        config = make_config(args.seed)
        if args.tiny:
            pipe, call_kwargs = _tiny_pipeline(args.seed)
        else:
            pipe, call_kwargs = _real_pipeline(args.model, args.prompt, args.device)
        pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
        device = "cpu" if args.tiny else args.device

        plain = run(pipe, call_kwargs, steps, args.seed, device)
        with tokenmerge.apply(pipe, config) as handle:
            merged = run(pipe, call_kwargs, steps, args.seed, device)
            state = handle.state
            print(f"config: {config.matcher!r}, {config.threshold!r}, {config.cache!r}")
            print(f"plans computed {state.plans_computed}, reused {state.plans_reused} over {steps} steps")
            for layer, (num_in, num_out) in state.merged_tokens.items():
                print(f"  {layer}: {num_in} -> {num_out} tokens")
        # Leaving the `with` block removed every hook: the pipeline is exactly as before.
        again = run(pipe, call_kwargs, steps, args.seed, device)
    except tokenmerge.TokenMergeError as error:
        print(f"custom_policy.py: error: {error}", file=sys.stderr)
        return 2

    difference = (merged.float() - plain.float()).abs().max().item()
    print(f"largest pixel difference to the plain pipeline: {difference:.4f}")
    print(f"after remove, identical to plain: {torch.equal(again, plain)}")
    if args.out:
        from PIL import Image

        array = (merged[0].permute(1, 2, 0).float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_script(main, "custom_policy.py", load_errors=(OSError,))
