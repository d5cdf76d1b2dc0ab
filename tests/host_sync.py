"""A dispatch-mode recorder of host-device syncs, shared by the tests of pure tensor code
(masks, mixes, losses, optimiser, batched augmentation) that must not stall a CUDA step.
pytest puts this folder on sys.path (the tests are not a package), so tests import it as
``from host_sync import HostSyncRecorder``."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncRecorder(TorchDispatchMode):
    """Records the ops that read a tensor value back to the host, which would stall a CUDA
    step: .item()/bool()/int() (aten::_local_scalar_dense), nonzero, masked_select and
    indexing with a boolean mask (its output size depends on the data)."""

    def __init__(self):
        super().__init__()
        self.syncing_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        indices = args[1] if name.startswith(("aten::index", "aten::_index_put")) else ()
        bool_index = any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices
        )
        if bool_index or name in {
            "aten::_local_scalar_dense",
            "aten::nonzero",
            "aten::masked_select",
            "aten::repeat_interleave.Tensor",
        }:
            self.syncing_ops.append(name)
        return func(*args, **(kwargs or {}))

