"""Batches of tokenised examples: right-padded, or packed into one padding-free row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class PadCollator:
    """Right-pad a batch to its longest example (rounded up to a multiple of 8), or pack it.

    Padded: labels are padded with -100 and the attention mask marks real tokens; each tensor
    is ``[batch, longest rounded up]``.

    Packed (``pack=True``, padding-free): the batch's examples are concatenated into one
    row with ``position_ids`` restarting at 0 for each example and no attention mask.
    transformers reads the restarts as sequence boundaries: sdpa/eager get a block-diagonal
    causal mask, flash-attention its varlen kernel, so no token attends across examples.
    The first label of each example is set to -100, so the last token of one example is not
    trained to predict the first token of the next; unpacked, that label is never used either
    (the causal-LM loss shifts labels by one), so the loss is the same token for token.

    The record indices (``idx``) are taken out of the batch and, with ``sample_log``, appended
    to a per-process file (one line of comma-separated indices per training micro-batch) so
    tests and users can check sharding and data order.
    """

    def __init__(self, pad_id: int, multiple: int = 8, sample_log: Path | None = None, pack: bool = False):
        self.pad_id, self.multiple, self.sample_log, self.pack = pad_id, multiple, sample_log, pack

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.sample_log is not None and features[0].get("train"):
            with open(self.sample_log, "a") as fh:
                fh.write(",".join(str(int(f["idx"])) for f in features) + "\n")
        if self.pack:
            return pack_examples([f["input_ids"] for f in features], [f["labels"] for f in features])
        n = max(len(f["input_ids"]) for f in features)
        n = -(-n // self.multiple) * self.multiple   # a multiple of 8: tensor-core friendly shapes
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            ids[row, :k] = torch.as_tensor(np.asarray(f["input_ids"], dtype=np.int64))
            labels[row, :k] = torch.as_tensor(np.asarray(f["labels"], dtype=np.int64))
            mask[row, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_examples(ids: list, labels: list) -> dict[str, torch.Tensor]:
    """Examples -> one packed row: ``input_ids``, ``labels``, ``position_ids``, each ``[1, total tokens]``.

    Positions restart at 0 per example (the boundary transformers detects); each example's
    first label is -100 (see PadCollator).
    """
    lens = [len(x) for x in ids]
    flat_ids = torch.as_tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
    flat_lab = torch.as_tensor(np.concatenate([np.asarray(x, dtype=np.int64) for x in labels]))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    flat_lab[torch.as_tensor(starts)] = -100
    pos = torch.cat([torch.arange(n, dtype=torch.long) for n in lens])
    return {"input_ids": flat_ids[None], "labels": flat_lab[None], "position_ids": pos[None]}


__all__ = ["PadCollator", "pack_examples"]
