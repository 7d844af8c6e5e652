"""MambaTalk's training loss on the 320-d MHR layout: latent regression and code classification per part, plus the
velocity / acceleration terms on motion decoded by the frozen VQ-VAEs (codes alone leave the motion jittery).

Every term compares tensors of the exact same shape (``common.shapes.assert_same_shape``); nothing broadcasts.
No model code and no pass / masking logic here (``gesture.lit.mambatalk``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.shapes import assert_same_shape, expect_shape
from gesture.layout import GLOBAL_ROT_DIM, PARTS, POSE_DIM, SUB_SLICES, VQ_PARTS
from gesture.models.mambatalk import GeneratorOutput

ALL_PARTS = (*VQ_PARTS, "global")
# Channels of each part's slice that velocity / acceleration terms compare. Global: the rotation only; foot contact
# is a 0/1 label whose steps are not motion (gesture.metrics measures the global velocity ratio the same way).
MOTION_CHANNELS = {p: slice(None) for p in VQ_PARTS} | {"global": slice(0, GLOBAL_ROT_DIM)}


def _within(part: str, sub: str) -> slice:
    """``layout.SUB_SLICES[sub]`` as channels of ``part``'s slice."""
    offset = PARTS[part].start
    return slice(SUB_SLICES[sub].start - offset, SUB_SLICES[sub].stop - offset)


# Speed groups of the ``profile`` term, channel slices of each part's motion channels: beat consistency's groups
# (the body; the left and the right hand, gesture.metrics.BC_PARAM_GROUPS), the whole face, the global rotation.
SPEED_GROUPS: dict[str, tuple[slice, ...]] = {
    "body": (slice(None),),
    "hand": (_within("hand", "hand_left"), _within("hand", "hand_right")),
    "face": (slice(None),),
    "global": (slice(None),),
}


@dataclass
class LossTargets:
    """Ground truth of one batch: ``motion [b, t, 320]`` normalised, the frozen VQ-VAEs' ``latents[p] [b, t, d]``
    and ``indices[p] [b, t]`` (long) for each part of ``VQ_PARTS``, and the raw foot contact labels
    ``contact [b, t, 4]`` (0/1 floats; needed when the generator classifies contact)."""

    motion: torch.Tensor
    latents: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]
    contact: torch.Tensor | None = None


def _weights(given: Mapping[str, float] | None, parts: Iterable[str], name: str) -> dict[str, float]:
    given = dict(given or {})
    unknown = set(given) - set(parts)
    if unknown:
        raise ValueError(f"{name}: unknown parts {sorted(unknown)} (parts: {list(parts)})")
    return {p: float(given.get(p, 0.0)) for p in parts}


def velocity(x: torch.Tensor) -> torch.Tensor:
    """First difference over time: ``[b, t, d] -> [b, t - 1, d]``."""
    return x[:, 1:] - x[:, :-1]


def group_speed(v: torch.Tensor, groups: Iterable[slice], eps: float = 1e-12) -> torch.Tensor:
    """Speed per channel group: velocities ``v [b, t, d]`` -> ``[b, t, G]`` Euclidean norms over each group's
    channels (``sqrt(sum v^2 + eps)``: differentiable at rest)."""
    return torch.stack([(v[..., g].square().sum(dim=-1) + eps).sqrt() for g in groups], dim=-1)


def acceleration(x: torch.Tensor) -> torch.Tensor:
    """Second difference over time: ``[b, t, d] -> [b, t - 2, d]``."""
    return x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]


class MambaTalkLoss(nn.Module):
    """Weighted sum of MambaTalk's terms (defaults: the weights measured for the MHR layout, README).

    Args:
        latent: MSE weight per part between the predicted and the VQ latent ("global": the regressed global slice,
            i.e. the rotation when the generator classifies foot contact, else all 7 channels).
        cls: cross-entropy weight per VQ part over the codebook (face 0: SAM-3D-Body faces are often constant).
        label_smoothing: per VQ part (body 0.1 against codebook oscillation).
        vel: L1 weight per part between the frame-to-frame differences of decoded motion and ground truth
            (global: its rotation channels only, not the foot contact labels).
        acc: the same on second differences (off by default).
        speed: L1 weight per part between the mean absolute frame-to-frame change of decoded motion and of ground
            truth, per sample (off by default). Unlike ``vel`` it does not ask for the timing of the motion, only
            for its amount: regression losses alone pull motion the inputs do not determine towards standing still.
        contact: binary cross-entropy weight of the foot contact logits against the 0/1 labels (used when the
            generator classifies contact, ``GeneratorOutput.contact_logits``).

    ``forward`` returns the weighted ``loss`` and every computed term unweighted (``latent/body``, ``cls/hand``,
    ``vel/global``, ...). Velocity / acceleration terms need ``decoded`` motion; without it they are left out.
    """

    def __init__(
        self,
        latent: Mapping[str, float] | None = None,
        cls: Mapping[str, float] | None = None,
        label_smoothing: Mapping[str, float] | None = None,
        vel: Mapping[str, float] | None = None,
        acc: Mapping[str, float] | None = None,
        speed: Mapping[str, float] | None = None,
        contact: float = 1.0,
        profile: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.latent_w = _weights(latent if latent is not None else dict.fromkeys(ALL_PARTS, 3.0), ALL_PARTS,
                                 "latent")
        self.cls_w = _weights(cls if cls is not None else {"body": 1.0, "hand": 2.0, "face": 0.0}, VQ_PARTS, "cls")
        self.smoothing = _weights(label_smoothing if label_smoothing is not None else {"body": 0.1}, VQ_PARTS,
                                  "label_smoothing")
        self.vel_w = _weights(vel if vel is not None else {"global": 2.0, "body": 0.5, "hand": 1.0}, ALL_PARTS, "vel")
        self.acc_w = _weights(acc, ALL_PARTS, "acc")
        self.speed_w = _weights(speed, ALL_PARTS, "speed")
        self.profile_w = _weights(profile, ALL_PARTS, "profile")
        # Raw units per normalised channel (the training std, set by the module from its data): speeds as the
        # metrics measure them. Ones = normalised units.
        self.register_buffer("channel_scale", torch.ones(POSE_DIM), persistent=False)
        if contact < 0:
            raise ValueError(f"contact weight must be >= 0, got {contact}")
        self.contact_w = float(contact)

    @property
    def decoded_parts(self) -> tuple[str, ...]:
        """Parts whose decoded motion the velocity / acceleration terms need."""
        return tuple(p for p in ALL_PARTS
                     if self.vel_w[p] > 0 or self.acc_w[p] > 0 or self.speed_w[p] > 0 or self.profile_w[p] > 0)

    def set_channel_scale(self, scale: torch.Tensor) -> None:
        """Raw units per normalised channel ``[320]`` (the training std) for the ``profile`` term."""
        expect_shape(scale, (POSE_DIM,), "channel_scale")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError("channel_scale must be finite and >= 0")
        self.channel_scale = scale.detach().to(self.channel_scale).clone()

    def without_parts(self, parts: Iterable[str]) -> MambaTalkLoss:
        """A copy with every weight of ``parts`` set to 0 (e.g. a zero-variance face)."""
        drop = set(parts)

        def keep(w: dict[str, float]) -> dict[str, float]:
            return {p: (0.0 if p in drop else v) for p, v in w.items()}

        copy = MambaTalkLoss(keep(self.latent_w), keep(self.cls_w), self.smoothing, keep(self.vel_w),
                             keep(self.acc_w), keep(self.speed_w), 0.0 if "global" in drop else self.contact_w,
                             keep(self.profile_w))
        copy.set_channel_scale(self.channel_scale)
        return copy

    def forward(self, out: GeneratorOutput, target: LossTargets, decoded: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """GeneratorOutput, LossTargets, decoded {part: [b, t, part_dim]} (``decoded_parts``) | None
        -> {"loss": [], term: []}."""
        terms: dict[str, torch.Tensor] = {}
        total = target.motion.new_zeros(())

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            nonlocal total
            terms[name] = value.detach()
            total = total + weight * value

        for p in VQ_PARTS:
            if self.latent_w[p] > 0:
                assert_same_shape(out.latents[p], target.latents[p], f"latent {p}", f"VQ latent {p}")
                add(f"latent/{p}", self.latent_w[p], F.mse_loss(out.latents[p], target.latents[p]))
            if self.cls_w[p] > 0:
                logits, idx = out.logits[p], target.indices[p]
                assert_same_shape(logits[..., 0], idx, f"logits {p} [..., 0]", f"codes {p}")
                add(f"cls/{p}", self.cls_w[p], F.cross_entropy(logits.flatten(0, 1), idx.flatten(0, 1),
                                                             label_smoothing=self.smoothing[p]))
        gt_global = target.motion[..., PARTS["global"]]
        assert_same_shape(out.global_motion, gt_global, "global", "gt global")
        classified = out.contact_logits is not None
        regressed = slice(0, GLOBAL_ROT_DIM) if classified else slice(None)  # contact decisions carry no gradient
        if self.latent_w["global"] > 0:
            add("latent/global", self.latent_w["global"],
                F.mse_loss(out.global_motion[..., regressed], gt_global[..., regressed]))
        if classified and self.contact_w > 0:
            if target.contact is None:
                raise ValueError("MambaTalkLoss: the generator classifies foot contact but LossTargets.contact "
                                 "(the raw 0/1 labels) is missing")
            assert_same_shape(out.contact_logits, target.contact, "contact logits", "contact labels")
            add("cls/contact", self.contact_w,
                F.binary_cross_entropy_with_logits(out.contact_logits, target.contact))
        if decoded is not None:
            missing = set(self.decoded_parts) - set(decoded)
            if missing:
                raise KeyError(f"MambaTalkLoss: decoded motion of parts {sorted(missing)} is needed")
            for p in self.decoded_parts:  # each part's motion channels sliced, and differenced, once
                gt_part = target.motion[..., PARTS[p]]
                assert_same_shape(decoded[p], gt_part, f"decoded {p}", f"gt {p}")
                ch = MOTION_CHANNELS[p]
                pred_m, gt_m = decoded[p][..., ch], gt_part[..., ch]
                v_pred, v_gt = velocity(pred_m), velocity(gt_m)
                assert_same_shape(v_pred, v_gt, f"vel {p}", f"gt vel {p}")
                if self.vel_w[p] > 0:
                    add(f"vel/{p}", self.vel_w[p], F.l1_loss(v_pred, v_gt))
                if self.acc_w[p] > 0:
                    a_pred, a_gt = acceleration(pred_m), acceleration(gt_m)
                    assert_same_shape(a_pred, a_gt, f"acc {p}", f"gt acc {p}")
                    add(f"acc/{p}", self.acc_w[p], F.l1_loss(a_pred, a_gt))
                if self.speed_w[p] > 0:
                    s_pred, s_gt = v_pred.abs().mean(dim=(1, 2)), v_gt.abs().mean(dim=(1, 2))  # [b] each
                    add(f"speed/{p}", self.speed_w[p], F.l1_loss(s_pred, s_gt))
                if self.profile_w[p] > 0:
                    scale = self.channel_scale.to(v_pred)[PARTS[p]][ch]
                    c_pred = group_speed(v_pred * scale, SPEED_GROUPS[p])  # [b, t - 1, G]
                    c_gt = group_speed(v_gt * scale, SPEED_GROUPS[p])
                    norm = c_gt.mean(dim=1, keepdim=True).clamp_min(1e-6)  # [b, 1, G], no gradient (gt)
                    add(f"profile/{p}", self.profile_w[p], F.l1_loss(c_pred / norm, c_gt / norm))
        expect_shape(total, (), "loss")
        terms["loss"] = total
        return terms
