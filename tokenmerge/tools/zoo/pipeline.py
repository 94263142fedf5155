"""Class-conditional pixel-space diffusion pipelines for the reference models.

Two `diffusers.DiffusionPipeline` subclasses share one sampling loop:

* `PixelDiTPipeline`: a `DiTTransformer2DModel` (``.transformer``) that takes the class
  label itself through its adaLN-Zero label embedding; the null class (for classifier-free
  guidance) is ``num_classes``.
* `PixelUNetPipeline`: a `UNet2DConditionModel` (``.unet``) whose cross-attention reads
  learned class tokens (`ClassTokens`, ``.class_tokens``) as ``encoder_hidden_states``.

Both denoise in pixel space (3 x 64 x 64, values in [-1, 1]): there is no VAE.
`diffusers.DiTPipeline` is not used because it requires a VAE and hard-codes the
ImageNet null class 1000.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from ...errors import TokenMergeError, check

__all__ = ["ClassTokens", "PixelDiffusionPipeline", "PixelDiTPipeline", "PixelUNetPipeline", "StepCallback"]

#: ``callback_on_step_end(pipe, step_index, timestep, kwargs) -> dict``, as in diffusers.
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


class ClassTokens(ModelMixin, ConfigMixin):
    """A learned table of ``num_tokens`` tokens per class, fed to cross-attention.

    Row ``num_classes`` is the null class used for classifier-free guidance.

    Args:
        num_classes: number of real classes.
        num_tokens: tokens per class (the cross-attention sequence length).
        dim: token width (the UNet's ``cross_attention_dim``).
    """

    @register_to_config
    def __init__(self, num_classes: int = 16, num_tokens: int = 4, dim: int = 64) -> None:
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, num_tokens * dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        """``(B,)`` labels in ``[0, num_classes]`` to ``(B, num_tokens, dim)`` tokens."""
        tokens = self.table(labels)  # (B, T * D)
        return tokens.view(labels.shape[0], self.config.num_tokens, self.config.dim)  # (B, T, D)


class PixelDiffusionPipeline(DiffusionPipeline):
    """Shared sampling loop: DDIM-style scheduler, classifier-free guidance in one batch.

    Subclasses provide `num_classes`, `sample_size` and `predict_noise`. Class names are
    passed as ``class_names`` and kept in ``pipe.class_names``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.class_names: list[str] = []

    # --------------------------------------------------------------- subclass API
    @property
    def num_classes(self) -> int:
        """Number of real classes; label ``num_classes`` is the null class."""
        raise NotImplementedError

    @property
    def sample_size(self) -> int:
        """Side of the square images, in pixels."""
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        """The network that predicts the noise (``.transformer`` or ``.unet``)."""
        raise NotImplementedError

    def predict_noise(self, sample: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        """Noise prediction ``(B, 3, H, W)`` for ``sample`` ``(B, 3, H, W)`` at ``timestep`` ``(B,)``."""
        raise NotImplementedError

    # --------------------------------------------------------------- helpers
    def label_ids(self, class_labels: int | str | Sequence[int | str] | Tensor) -> Tensor:
        """Class labels (ints or class names) as a ``(B,)`` long tensor, validated."""
        if isinstance(class_labels, Tensor):
            labels = [int(v) for v in class_labels.reshape(-1).tolist()]
        elif isinstance(class_labels, (int, str)):
            labels = [class_labels]
        else:
            labels = list(class_labels)
        ids: list[int] = []
        for label in labels:
            if isinstance(label, str):
                check(
                    label in self.class_names,
                    f"class_labels: unknown class name {label!r}; allowed: {', '.join(self.class_names)}",
                )
                ids.append(self.class_names.index(label))
            else:
                check(
                    isinstance(label, (int, np.integer)) and 0 <= int(label) < self.num_classes,
                    f"class_labels must be class names or ints in [0, {self.num_classes}); got {label!r}",
                )
                ids.append(int(label))
        check(len(ids) > 0, "class_labels must name at least one class")
        return torch.tensor(ids, dtype=torch.long, device=self._execution_device)

    # --------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | Tensor,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepCallback | None = None,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate one image per class label.

        Args:
            class_labels: class indices or class names (see ``pipe.class_names``).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight; ``<= 1`` disables guidance
                (one denoiser call per step instead of a doubled batch).
            generator: torch generator(s) for the initial noise.
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (``(B, H, W, 3)`` float
                array in [0, 1]) or ``"pt"`` (``(B, 3, H, W)`` tensor in [0, 1]).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            callback_on_step_end: called after every step as
                ``callback(pipe, step_index, timestep, {})``.

        Returns:
            `ImagePipelineOutput` with ``images``, or ``(images,)``.
        """
        check(
            isinstance(num_inference_steps, int) and num_inference_steps >= 1,
            f"num_inference_steps must be an int >= 1; got {num_inference_steps!r}",
        )
        check(output_type in ("pil", "np", "pt"), f"output_type must be 'pil', 'np' or 'pt'; got {output_type!r}")
        labels = self.label_ids(class_labels)  # (B,)
        batch = labels.shape[0]
        device = self._execution_device
        dtype = self.denoiser.dtype
        size = self.sample_size
        sample = randn_tensor((batch, 3, size, size), generator=generator, device=device, dtype=dtype)  # (B, 3, H, W)
        guided = guidance_scale > 1.0
        if guided:
            null = torch.full_like(labels, self.num_classes)
            labels_in = torch.cat([labels, null])  # (2B,)
        else:
            labels_in = labels
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for index, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([sample, sample]) if guided else sample  # (2B or B, 3, H, W)
            model_in = self.scheduler.scale_model_input(model_in, t)
            timestep = t.expand(model_in.shape[0]).to(device)  # (2B or B,)
            noise = self.predict_noise(model_in, timestep, labels_in)
            if guided:
                cond, uncond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(noise, t, sample).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, index, t, {})
        images = (sample.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
        if output_type == "pt":
            out: Any = images
        else:
            array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
            out = array if output_type == "np" else self.numpy_to_pil(array)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)


class PixelDiTPipeline(PixelDiffusionPipeline):
    """A pixel-space class-conditional DiT (``.transformer``) with a scheduler.

    Args:
        transformer: a `DiTTransformer2DModel` with ``in_channels = out_channels = 3`` and
            ``num_embeds_ada_norm`` = number of classes.
        scheduler: a diffusers scheduler (DDIM for the reference models).
        class_names: optional names of the classes, in label order.
    """

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler: SchedulerMixin,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.class_names = list(class_names or [])

    @property
    def num_classes(self) -> int:
        """``transformer.config.num_embeds_ada_norm``."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def sample_size(self) -> int:
        """``transformer.config.sample_size`` (pixels: there is no VAE)."""
        return int(self.transformer.config.sample_size)

    @property
    def denoiser(self) -> nn.Module:
        """``self.transformer``."""
        return self.transformer

    def predict_noise(self, sample: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        """Call the DiT with ``class_labels``."""
        return self.transformer(sample, timestep=timestep, class_labels=labels, return_dict=False)[0]


class PixelUNetPipeline(PixelDiffusionPipeline):
    """A pixel-space UNet (``.unet``) conditioned on learned class tokens (``.class_tokens``).

    Args:
        unet: a `UNet2DConditionModel` with 3 input and output channels and
            ``cross_attention_dim == class_tokens.config.dim``.
        class_tokens: the `ClassTokens` table.
        scheduler: a diffusers scheduler (DDIM for the reference models).
        class_names: optional names of the classes, in label order.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        class_tokens: ClassTokens,
        scheduler: SchedulerMixin,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if unet.config.cross_attention_dim != class_tokens.config.dim:
            raise TokenMergeError(
                f"class_tokens.config.dim must equal unet.config.cross_attention_dim "
                f"({unet.config.cross_attention_dim}); got {class_tokens.config.dim}"
            )
        self.register_modules(unet=unet, class_tokens=class_tokens, scheduler=scheduler)
        self.class_names = list(class_names or [])

    @property
    def num_classes(self) -> int:
        """``class_tokens.config.num_classes``."""
        return int(self.class_tokens.config.num_classes)

    @property
    def sample_size(self) -> int:
        """``unet.config.sample_size`` (pixels: there is no VAE)."""
        return int(self.unet.config.sample_size)

    @property
    def denoiser(self) -> nn.Module:
        """``self.unet``."""
        return self.unet

    def predict_noise(self, sample: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        """Call the UNet with the class tokens as ``encoder_hidden_states``."""
        context = self.class_tokens(labels).to(sample.dtype)  # (B, T, D)
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
