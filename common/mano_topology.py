"""MANO's topology and conventions as constants: counts, joint orders, parents, fingertip vertices, mirroring.

Shared by the MANO layer (``common.mano``) and the procedural stand-in (``common.mano_procedural``) without either
importing the other at module level; ``common.mano`` re-exports every name.
"""

NUM_VERTS = 778
NUM_FACES = 1538
NUM_BETAS = 10
POSE_DIM = 48  # global orientation (3) + 15 finger joints x 3, axis-angle

# MANO's own joint order (what its J_regressor and kintree_table use).
MANO_NATIVE_JOINTS = (
    "wrist",
    "index1", "index2", "index3",
    "middle1", "middle2", "middle3",
    "pinky1", "pinky2", "pinky3",
    "ring1", "ring2", "ring3",
    "thumb1", "thumb2", "thumb3",
)
MANO_PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
# Fingertip vertex ids, smplx convention (smplx.vertex_ids.VERTEX_IDS["mano"]), in the order
# thumb, index, middle, ring, pinky. manopth uses 745, 317, 444, 556, 673 and the FreiHAND toolbox
# 744, 320, 443, 555, 672: a dataset annotated with those differs by a few millimetres at ring and pinky tips.
FINGERTIP_VERTEX_IDS = (744, 320, 443, 554, 671)
FINGERTIP_NAMES = ("thumb", "index", "middle", "ring", "pinky")
# OpenPose / FreiHAND 21-joint order; the thumb's joints are carpometacarpal, metacarpophalangeal, interphalangeal.
JOINT_NAMES_21 = (
    "wrist",
    "thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip",
    "index_mcp", "index_pip", "index_dip", "index_tip",
    "middle_mcp", "middle_pip", "middle_dip", "middle_tip",
    "ring_mcp", "ring_pip", "ring_dip", "ring_tip",
    "pinky_mcp", "pinky_pip", "pinky_dip", "pinky_tip",
)
# joints_21 = cat([native_16, vertices[FINGERTIP_VERTEX_IDS]])[NATIVE16_TIPS_TO_21]
NATIVE16_TIPS_TO_21 = (0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20)

# Mirroring a hand in x (right <-> left) keeps the x component of every axis-angle and negates y and z.
MIRROR_AXIS_ANGLE_SIGNS = (1.0, -1.0, -1.0)
