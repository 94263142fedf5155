"""Train tokenmerge's reference diffusion models (``dit-photos`` and ``unet-photos``).

Examples::

    # one CUDA GPU, both models within 3.5 minutes (bf16 autocast):
    python examples/train_reference.py --device cuda --minutes 3.5 --out gpu-weights
    # CPU, a fixed number of steps:
    nice -n 19 python examples/train_reference.py --device cpu --steps 400 --out cpu-weights

Copy the ``*.safetensors``, ``*.json`` and ``heldout_crops.npz`` it writes into
``tokenmerge/tools/zoo/weights/`` to ship them. See ``tokenmerge/tools/zoo/README.md``.
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
