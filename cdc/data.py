"""What every cdc data source hands out, and which of its devices are held out.

A data source is ``cdc.moving_shapes.MovingShapes`` (the spec's synthetic video QA + retrieval task,
rendered by this repo) or ``cdc.feature_benchmark.FeatureBenchmark`` (MSRVTT-QA, MSVD-QA, MSR-VTT
retrieval read from pre-extracted features; the file format is documented at
``cdc.feature_benchmark.load_feature_split``); ``cdc.experiment.build_dataset`` builds the one that
``config.data.name`` names. Both hand out the videos, questions and captions of one domain (a
device, or the cloud's ``SOURCE``) and one split as a ``DomainData``.

**Held-out devices.** ``split_devices`` fixes which devices are held out from meta-training by
``data.split_seed`` alone (not the run seed, not the dataset seed), so every run, seed and preset
with the same ``num_devices`` tests on the same devices. A source's ``meta_train_devices`` and
``heldout_devices`` are disjoint; its ``check_meta_train`` refuses a held-out device, and the
meta-training bank is built through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SOURCE = -1  # the cloud's canonical domain


def split_devices(num_devices: int, num_heldout: int, split_seed: int) -> tuple[np.ndarray, ...]:
  """(meta-train device ids, held-out device ids), sorted int32, fixed by ``split_seed``.

  Raises:
    ValueError: unless ``1 <= num_heldout < num_devices``.
  """
  if not 1 <= num_heldout < num_devices:
    raise ValueError(
      f"data.num_heldout={num_heldout} must be in [1, data.num_devices={num_devices})"
    )
  order = np.random.default_rng([split_seed, num_devices]).permutation(num_devices)
  return np.sort(order[num_heldout:]).astype(np.int32), np.sort(order[:num_heldout]).astype(
    np.int32
  )


@dataclasses.dataclass
class DomainData:
  """The videos, questions and captions of one domain (a device, or the source) and one split.

  Frames are pixels (moving shapes) or pre-extracted features (real benchmarks):

  Attributes:
    frames: float32 [V, T, H, W, 3] in [-1, 1], or float32 [V, T, D_v] features.
    frame_mask: bool [V, T], which frames exist (real videos have different lengths).
    questions: int32 [N_q, L] token ids, or float32 [N_q, L, D_q] token features.
    question_mask: bool [N_q, L].
    question_video: int32 [N_q], the video each question is about.
    answers: int32 [N_q], into the answer vocabulary.
    question_type: int32 [N_q], a template id (-1 when unknown).
    captions: int32 [N_c, L_c] or float32 [N_c, L_c, D_q]; captions for retrieval.
    caption_mask: bool [N_c, L_c].
    caption_video: int32 [N_c], the video each caption describes.
    domain: the device id (``SOURCE`` for the source).
  """

  frames: np.ndarray
  frame_mask: np.ndarray
  questions: np.ndarray
  question_mask: np.ndarray
  question_video: np.ndarray
  answers: np.ndarray
  question_type: np.ndarray
  captions: np.ndarray
  caption_mask: np.ndarray
  caption_video: np.ndarray
  domain: int

  @property
  def num_videos(self) -> int:
    return int(self.frames.shape[0])


def concat_domains(parts: Sequence[DomainData], domain: int) -> DomainData:
  """Concatenates domains, shifting the video indices of questions and captions."""
  if not parts:
    raise ValueError("concat_domains: nothing to concatenate")
  offsets = np.cumsum([0] + [p.num_videos for p in parts[:-1]])
  cat = lambda name: np.concatenate([getattr(p, name) for p in parts])
  return DomainData(
    frames=cat("frames"),
    frame_mask=cat("frame_mask"),
    questions=cat("questions"),
    question_mask=cat("question_mask"),
    question_video=np.concatenate(
      [p.question_video + o for p, o in zip(parts, offsets, strict=True)]
    ).astype(np.int32),
    answers=cat("answers"),
    question_type=cat("question_type"),
    captions=cat("captions"),
    caption_mask=cat("caption_mask"),
    caption_video=np.concatenate(
      [p.caption_video + o for p, o in zip(parts, offsets, strict=True)]
    ).astype(np.int32),
    domain=domain,
  )
