"""The tooling around the core: command line, demo, benchmarks, fidelity, reference models.

Nothing here is needed to merge tokens in a model; `import tokenmerge` does not import
this package, and importing it imports none of its modules.

* `tokenmerge.tools.cli`: the ``tokenmerge`` command (``python -m tokenmerge``);
* `tokenmerge.tools.demo`: ``tokenmerge demo`` and ``tokenmerge visualize``;
* `tokenmerge.tools.vis`: pictures of merged token groups;
* `tokenmerge.tools.bench`: ``tokenmerge bench``, speed and fidelity against the plain
  model, with `bench_methods` (method specs), `bench_models` (architectures and their
  inputs) and `bench_timing` (timing, compilation, operator counts);
* `tokenmerge.tools.ideal`: the zero-overhead ideal matcher the benchmark compares with;
* `tokenmerge.tools.fidelity`: ``tokenmerge fidelity``, image quality on the reference models;
* `tokenmerge.tools.zoo`: the small trained reference pipelines, and their training;
* `tokenmerge.tools.tiny`: tiny random-weight diffusers models for tests, examples and the demo;
* `tokenmerge.tools.common`: what they share, one of each: device names and resolution,
  synchronisation, seeding, PSNR, progress bars.
"""

__all__: list[str] = []
