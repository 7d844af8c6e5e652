"""Frame tokens of a frozen per-frame encoder, computed once for every frame of a split (Stage 2 training).

Stage 2 with a frozen token encoder (``net.freeze_encoder``) trains only what comes after the per-frame tokens,
yet every window would run the backbone on all of its frames again: 7 forward passes per sample, the whole cost
of a CPU step. ``compute_frame_tokens`` runs the encoder once per frame of the split (un-augmented crops, eval
mode, no gradient); :meth:`HandWindowDataset.use_frame_tokens` then serves windows of these tokens instead of
images. The tokens are recomputed whenever fitting starts (a resumed run too): nothing of them is saved.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data.collate import CheckedCollate
from handpose.data.dataset import HandWindowDataset, sample_spec
from handpose.models import PoseNet

log = logging.getLogger(__name__)


def every_frame_view(dataset: HandWindowDataset) -> HandWindowDataset:
    """One-frame windows ending at every frame (valid or not) of ``dataset``'s sequences, un-augmented, in the
    same sequence order (so its ``seq_index`` is ``dataset``'s)."""
    return HandWindowDataset(
        dataset.root, dataset.split, num_frame=1, img_size=dataset.img_size, stride=1, bbox_scale=dataset.bbox_scale,
        augment=None, flat_hand_mean=dataset.flat_hand_mean, mano_model_path=dataset.mano_model_path,
        limit_sequences=len(dataset.sequences), window_ends=lambda seq: np.ones(len(seq), bool),
    )


@torch.no_grad()
def compute_frame_tokens(net: PoseNet, dataset: HandWindowDataset, batch_size: int = 64,
                         num_workers: int = 0, ground_truth_joints_2d: bool = False) -> list[np.ndarray]:
    """Tokens of every frame of ``dataset``'s sequences through ``net``'s per-frame encoder -> one
    ``[n_frames, token_dim]`` float32 array per sequence (split order). A frame the loader could not read stays
    NaN (the windows containing it are then skipped by the dataset, and counted).

    ``ground_truth_joints_2d`` (an oracle, for ``handpose.headroom``): the joint MLP of every valid frame reads the
    annotated 2D joints instead of the heatmap head's (needs a net whose decoder uses the joints)."""
    if ground_truth_joints_2d and not (net.has_heatmaps and net.decoder.uses_joints):
        raise ValueError("ground_truth_joints_2d needs a PoseNet whose joint MLP reads the heatmap head's 2D joints")
    frames = every_frame_view(dataset)
    loader = DataLoader(frames, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=CheckedCollate(sample_spec(1, frames.img_size)))
    tokens = [np.full((len(seq), net.token_dim), np.nan, np.float32) for seq in frames.sequences]
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    start, done = time.perf_counter(), 0
    try:
        for batch in loader:
            hint = None
            if ground_truth_joints_2d:
                joints = batch["joints_2d"].to(device)  # [b, 1, 21, 2] crop pixels
                use = batch["valid"].to(device).bool() & torch.isfinite(joints).flatten(2).all(-1)
                hint = (torch.nan_to_num(joints), use)
            out = net.encode_frames(*(batch[k].to(device) for k in ("img", "bbox", "focal", "princpt")), joint_hint=hint)
            out = out[:, 0].float().cpu().numpy()  # [b, d]
            for row, s, f in zip(out, batch["seq_index"][:, 0].tolist(), batch["frame_index"][:, 0].tolist()):
                tokens[s][f] = row
            done += len(out)
    finally:
        net.train(was_training)
    missing = sum(int(np.isnan(t[:, 0]).sum()) for t in tokens)
    log.info("frame tokens%s of %s split %r: %d frames in %.1f s%s",
             " (ground-truth 2D joints)" if ground_truth_joints_2d else "", dataset.root, dataset.split, done,
             time.perf_counter() - start, f" ({missing} unreadable: windows with them are skipped)" if missing else "")
    return tokens


def attach_frame_tokens(net: PoseNet, dataset: HandWindowDataset, batch_size: int = 64, num_workers: int = 0) -> None:
    """:func:`compute_frame_tokens` of ``dataset`` (on ``net``'s device), then make its windows carry them."""
    dataset.use_frame_tokens(compute_frame_tokens(net, dataset, batch_size, num_workers))
