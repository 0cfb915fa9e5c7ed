"""How a ProtoPool model is saved and loaded: strict, safetensors-only loading; the files `save_pretrained` adds.

`ProtoPoolPreTrainedModel` inherits [`StrictLoadingMixin`]. `from_pretrained` raises, naming the folder, the
tensors and the fix, where transformers would only log: a missing tensor, a shape that differs from what
`config.json` implies, a truncated `model.safetensors`, a folder with pickle-based weights only. `save_pretrained`
adds the `auto_map` for `trust_remote_code` and `preprocessor_config.json` for `AutoImageProcessor`.

This module is part of what `save_pretrained` copies for remote code: it imports only the package's preprocessing.
"""

import json
import os
import warnings
from typing import Any

import torch
from safetensors import SafetensorError

from .preprocessing import image_processor_dict


__all__ = ["StrictLoadingMixin"]


class StrictLoadingMixin:
    """`from_pretrained` / `save_pretrained` of a `PreTrainedModel` with ProtoPool's loading policy.

    Put it before `PreTrainedModel` in the bases of a model with a ProtoPool `head`. When
    `ignore_mismatched_sizes=True` re-initialises head tensors, `from_pretrained` calls `restart_head`.

    Example:
        ```python
        >>> import tempfile
        >>> from protopool_hf import ProtoPoolConfig, ProtoPoolForImageClassification
        >>> config = ProtoPoolConfig(backbone="test_resnet", num_labels=3, num_prototypes=6, num_slots_per_class=2)
        >>> folder = tempfile.mkdtemp()
        >>> ProtoPoolForImageClassification(config).save_pretrained(folder)
        >>> ProtoPoolForImageClassification.from_pretrained(folder, num_labels=4)
        Traceback (most recent call last):
        ...
        ValueError: The weights of ... do not match its config.json: tensors whose shapes differ ...

        ```
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, strict: weights only from safetensors, every tensor present, shapes equal.

        transformers re-initialises a missing tensor with only a log line, and names mismatched shapes only in its
        log; pickle-based `pytorch_model.bin` files can run code. Here each of these raises an error that names the
        folder, the tensors and the fix. `ignore_mismatched_sizes=True` keeps transformers' behaviour for shapes, the
        fine-tuning path of the HF guides (`num_labels=4, id2label=..., ignore_mismatched_sizes=True`): when head
        tensors are re-initialised, the assignment restarts soft at s = 1 and the projection provenance is cleared,
        with a warning, since neither describes the new head.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("use_safetensors") is False or kwargs.get("weights_only") is False:
            raise ValueError(
                f"ProtoPool models load weights only from model.safetensors (pickle-based files can run code); "
                f"got use_safetensors/weights_only=False for {source!r}."
            )
        kwargs["use_safetensors"] = True
        with_info = kwargs.pop("output_loading_info", False)
        lenient = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except SafetensorError as error:
            raise ValueError(
                f"Cannot read the weights of {source!r} ({error}): its model.safetensors is truncated or corrupt, "
                "e.g. by an interrupted download or copy. Download it again (force_download=True) or save the model "
                "again."
            ) from error
        except OSError as error:
            if "no file named model.safetensors" not in str(error):
                raise
            raise OSError(
                f"{source!r} holds no model.safetensors. ProtoPool models load weights only from safetensors, never "
                "from pickle-based files (pytorch_model.bin), whose loading can run code. Convert trusted weights: "
                "model.save_pretrained(folder) writes model.safetensors."
            ) from error
        problems = []
        if info["missing_keys"]:
            problems.append(f"missing tensors {sorted(info['missing_keys'])}")
        if info["mismatched_keys"] and not lenient:
            shapes = ", ".join(
                f"{key}: checkpoint {tuple(a)} vs config {tuple(b)}" for key, a, b in sorted(info["mismatched_keys"])
            )
            problems.append(f"tensors whose shapes differ from what config.json implies ({shapes})")
        if problems:
            raise ValueError(
                f"The weights of {source!r} do not match its config.json: {'; '.join(problems)}. The config's sizes "
                "(num_labels, num_prototypes, num_slots_per_class, prototype_dim, backbone) must be those the "
                "weights were saved with: restore the config.json saved with these weights."
            )
        reinitialised = sorted(key for key, *_ in info["mismatched_keys"] if key.startswith("head."))
        if reinitialised:
            model.restart_head(reinitialised, source)
        return (model, info) if with_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`, plus the `auto_map` for remote code and `preprocessor_config.json`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_protopool.ProtoPoolConfig",
            "AutoModel": "modeling_protopool.ProtoPoolForImageClassification",
            "AutoModelForImageClassification": "modeling_protopool.ProtoPoolForImageClassification",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            path = os.path.join(save_directory, "preprocessor_config.json")
            with open(path + ".tmp", "w") as handle:
                json.dump(image_processor_dict(self.config), handle, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)

    @torch.no_grad()
    def restart_head(self, reinitialised: list[str], source: str = "the checkpoint") -> None:
        """After head tensors were re-initialised: a soft assignment at s = 1, no projection provenance, a warning.

        `from_pretrained(..., ignore_mismatched_sizes=True)` calls it when it re-initialises head tensors (new
        `num_labels`, ...): a hardened assignment would turn the new random slot logits into a one-hot choice that
        cross-entropy cannot train, and the old provenance (image indices, labels, dataset) no longer describes the
        head.

        Args:
            reinitialised: the names of the re-initialised tensors, for the warning.
            source: the checkpoint's name, for the warning.
        """
        self.head.hard_assignment.fill_(False)
        self.head.gumbel_scale.fill_(1.0)
        self._gumbel_scale_set = self._scale_checked = False
        self.clear_projection_provenance()
        warnings.warn(
            f"{source}: the head tensors {reinitialised} were re-initialised (ignore_mismatched_sizes=True), so the "
            "slot assignment restarts soft at scale s=1 and the projection provenance was cleared. Train the new "
            "head with protopool_hf.GumbelScheduleCallback, then project the prototypes again.",
            UserWarning,
            stacklevel=3,
        )
