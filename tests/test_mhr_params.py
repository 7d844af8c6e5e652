"""MHR model parameters composed from predicted per-frame parameters as SAM-3D-Body's head composes them, against a
float64 numpy reference written from its definition (Gram-Schmidt of the two columns, Euler angles by atan2 of the
matrix entries, sin/cos angles, scale and hand PCA bases), on random bases saved as a SAM-3D-Body checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gesture.mhr_params import BUFFERS, HAND_DOFS, HeadBases, compose_model_params, hand_cont_to_model_params


def _reference_hand(cont: np.ndarray) -> np.ndarray:
    """[54] -> [27]: joint by joint, 3-DoF joints from 6 numbers, 1/2-DoF joints from (sin, cos) pairs."""
    out, c = [], 0
    for k in HAND_DOFS:
        if k == 3:
            x_raw, y_raw = cont[c:c + 3], cont[c + 3:c + 6]
            x = x_raw / np.linalg.norm(x_raw)
            z = np.cross(x, y_raw)
            z /= np.linalg.norm(z)
            y = np.cross(z, x)
            m = np.stack([x, y, z], axis=1)
            sy = np.hypot(m[0, 0], m[1, 0])
            out += [np.arctan2(m[2, 1], m[2, 2]), np.arctan2(-m[2, 0], sy), np.arctan2(m[1, 0], m[0, 0])]
            c += 6
        else:
            for _ in range(k):
                out.append(np.arctan2(cont[c], cont[c + 1]))
                c += 2
    assert c == 54
    return np.array(out)


@pytest.fixture()
def bases(tmp_path) -> tuple[HeadBases, str]:
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(130, generator=g) + 6  # hand joints sit among the body parameters
    state = {"head_pose.scale_mean": torch.randn(68, generator=g), "head_pose.scale_comps": torch.randn(28, 68, generator=g),
             "head_pose.hand_pose_mean": torch.randn(54, generator=g),
             "head_pose.hand_pose_comps": 0.3 * torch.randn(54, 54, generator=g),
             "head_pose.hand_joint_idxs_left": perm[:27], "head_pose.hand_joint_idxs_right": perm[27:54],
             "head_pose_hand.scale_mean": torch.zeros(68), "backbone.w": torch.zeros(2)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    return HeadBases.from_checkpoint(path), state


def test_hand_parameters_match_the_reference():
    cont = torch.randn(5, 54, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = hand_cont_to_model_params(cont).numpy()
    for row, ref in zip(got, (_reference_hand(c) for c in cont.numpy())):
        np.testing.assert_allclose(row, ref, atol=1e-9)


def test_model_params_match_the_reference_and_the_bases_come_from_the_checkpoint(bases):
    heads, state = bases
    g = torch.Generator().manual_seed(2)
    n = 4
    rot, body = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 133, generator=g, dtype=torch.float64)
    hand, scale = torch.randn(n, 108, generator=g, dtype=torch.float64), torch.randn(1, 28, generator=g, dtype=torch.float64)
    got = compose_model_params(rot, body, hand, scale, heads).numpy()
    assert got.shape == (n, 204)
    s = {k[len("head_pose."):]: v.double().numpy() for k, v in state.items() if k.startswith("head_pose.")}
    for i in range(n):
        pose = np.concatenate([np.zeros(3), rot[i].numpy(), body[i, :130].numpy()])
        for side, coeffs in (("left", hand[i, :54]), ("right", hand[i, 54:])):
            pose[s[f"hand_joint_idxs_{side}"].astype(int)] = _reference_hand(
                s["hand_pose_mean"] + coeffs.numpy() @ s["hand_pose_comps"])
        ref = np.concatenate([pose, s["scale_mean"] + scale[0].numpy() @ s["scale_comps"]])
        np.testing.assert_allclose(got[i], ref, atol=1e-6)
    assert not np.allclose(got[:, 6:136], np.pad(body[:, :130].numpy(), ((0, 0), (0, 0))))  # the hands were put in


def test_a_checkpoint_without_the_head_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"head_pose.scale_mean": torch.zeros(68)}}, tmp_path / "x.ckpt")
    with pytest.raises(KeyError, match=r"x\.ckpt.*missing.*head_pose\.scale_comps"):
        HeadBases.from_checkpoint(tmp_path / "x.ckpt")
    assert set(BUFFERS) >= {"scale_mean", "hand_pose_comps"}
