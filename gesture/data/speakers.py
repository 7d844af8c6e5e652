"""Raw speaker ids (BEAT clip names, per-clip ``vid``) to contiguous embedding indices with one unknown slot.

``vid = -1`` (unknown speaker) fed straight into ``nn.Embedding`` crashes on the GPU; here -1 / None map to
the reserved ``unknown_index`` and any other id outside the map raises, so no invalid index leaves the loader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

UNKNOWN_RAW = -1
# BEAT clip names: <speaker>_<name>_<a>_<b>_<c>, e.g. 2_scott_0_1_1 (speaker 2).
BEAT_NAME = re.compile(r"^(\d+)_([A-Za-z]+)_(\d+)_(\d+)_(\d+)$")


def speaker_from_name(clip: str) -> int | None:
    """The BEAT speaker id of a clip name, or None for names not in the BEAT pattern."""
    m = BEAT_NAME.match(clip)
    return int(m.group(1)) if m else None


class SpeakerMap:
    """Contiguous indices ``0 .. num_known-1`` for the known raw ids (sorted), ``unknown_index = num_known``."""

    def __init__(self, raw_ids: Iterable[int]):
        ids = sorted({int(r) for r in raw_ids})
        if any(r < 0 for r in ids):
            raise ValueError(f"known speaker ids must be >= 0, got {ids}")
        self.raw_ids: list[int] = ids
        self._index = {r: i for i, r in enumerate(ids)}

    @property
    def num_known(self) -> int:
        return len(self.raw_ids)

    @property
    def unknown_index(self) -> int:
        return self.num_known

    @property
    def num_embeddings(self) -> int:
        """Rows the speaker embedding needs (known speakers + the unknown slot)."""
        return self.num_known + 1

    def index(self, raw_id: int | None) -> int:
        """Embedding index of ``raw_id``; -1 / None -> ``unknown_index``; any other id not in the map raises."""
        if raw_id is None or int(raw_id) == UNKNOWN_RAW:
            return self.unknown_index
        if int(raw_id) != raw_id:
            raise ValueError(f"speaker id must be an integer, got {raw_id!r}")
        try:
            return self._index[int(raw_id)]
        except KeyError:
            raise KeyError(f"speaker id {raw_id} is not in the speaker map (known: {self.raw_ids})") from None

    def to_json(self) -> str:
        return json.dumps({"raw_ids": self.raw_ids, "unknown_index": self.unknown_index})

    @classmethod
    def from_json(cls, text: str) -> SpeakerMap:
        return cls(json.loads(text)["raw_ids"])

    def __repr__(self) -> str:
        return f"SpeakerMap(num_known={self.num_known}, raw_ids={self.raw_ids})"
