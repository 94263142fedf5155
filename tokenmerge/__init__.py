"""tokenmerge: token merging for diffusion models and Vision Transformers.

Compose a policy from a `Matcher`, a `ThresholdPolicy` and a `PairCache` (or take a
preset: `ToMeSD`, `CAToMe`, `ToMe`, `ToDo`) and `apply` it to a model::

    import tokenmerge
    handle = tokenmerge.apply(pipe, tokenmerge.CAToMe(threshold=0.7, seed=0))
    image = pipe(prompt).images[0]
    handle.remove()

`import tokenmerge` imports neither diffusers nor timm.
"""

from .api import MergeHandle, apply, get_handle, remove
from .config import MergeConfig
from .errors import TokenMergeError
from .layout import TokenLayout
from .plan import MergePlan, identity_token_map, proportional_attention_bias, source_matrix
from .presets import CAToMe, ToDo, ToMe, ToMeSD
from .state import MergeState

__version__ = "0.1.0"

__all__ = [
    "apply",
    "remove",
    "ToMe",
    "ToMeSD",
    "CAToMe",
    "ToDo",
    "get_handle",
    "MergeHandle",
    "MergeConfig",
    "MergeState",
    "MergePlan",
    "TokenLayout",
    "TokenMergeError",
    "proportional_attention_bias",
    "source_matrix",
    "identity_token_map",
    "__version__",
]
