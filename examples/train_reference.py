"""Train tokenmerge's reference models: diffusion (``dit-photos``, ``unet-photos``) and the ViT (``vit-photos``).

Examples::

    # one CUDA GPU, both diffusion models within 3.5 minutes (bf16 autocast):
    python examples/train_reference.py --device cuda --minutes 3.5 --out gpu-weights
    # CPU, a fixed number of steps:
    nice -n 19 python examples/train_reference.py --device cpu --steps 400 --out cpu-weights
    # the reference ViT classifier on a 2-core CPU within 27 minutes (how the shipped one was trained):
    nice -n 5 python examples/train_reference.py --device cpu --models vit-photos --minutes 27 --threads 2 \
        --out out/cpu-vit

Copy the ``*.safetensors``, ``*.json``, ``heldout_crops.npz`` and ``heldout_strips.npz`` it
writes into ``tokenmerge/tools/zoo/weights/`` to ship them. See ``tokenmerge/tools/zoo/README.md``.
"""

import sys
from pathlib import Path

try:
    import tokenmerge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmerge.tools.zoo.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
