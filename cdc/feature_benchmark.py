"""Real benchmarks (MSRVTT-QA, MSVD-QA, MSR-VTT retrieval) read from pre-extracted features.

The user extracts features once with any frozen backbone and writes one ``.npz`` per split; the
format is documented at ``load_feature_split``. A benchmark's "devices" are groups of videos sharing
a domain id (e.g. MSR-VTT's 20 categories), split into meta-training and held-out ones by
``cdc.data.split_devices``; each (device, split) is handed out as a ``cdc.data.DomainData``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from cdc.data import SOURCE, DomainData, concat_domains, split_devices

_REQUIRED = ("frame_features", "video_domain")
_QA_KEYS = ("question_features", "question_video", "answers")
_RET_KEYS = ("caption_features", "caption_video")


@dataclasses.dataclass
class FeatureSplit:
  """One split of a real benchmark read from a features file (``load_feature_split``)."""

  frame_features: np.ndarray  # float32 [V, T, D_v]
  frame_mask: np.ndarray  # bool [V, T]
  video_domain: np.ndarray  # int32 [V]
  question_features: np.ndarray | None  # float32 [N_q, L, D_q]
  question_mask: np.ndarray | None  # bool [N_q, L]
  question_video: np.ndarray | None  # int32 [N_q]
  answers: np.ndarray | None  # int32 [N_q]
  question_type: np.ndarray | None  # int32 [N_q]
  caption_features: np.ndarray | None  # float32 [N_c, L_c, D_q]
  caption_mask: np.ndarray | None  # bool [N_c, L_c]
  caption_video: np.ndarray | None  # int32 [N_c]
  answer_vocab: tuple[str, ...]
  path: str

  @property
  def domains(self) -> np.ndarray:
    """The distinct domain ids, sorted."""
    return np.unique(self.video_domain)

  def domain(self, domain: int) -> DomainData:
    """The videos of one domain and the questions/captions about them, indices remapped.

    A benchmark without questions (retrieval only) gets empty question arrays, one without
    captions (QA only) empty caption arrays.
    """
    vids = np.flatnonzero(self.video_domain == domain)
    if vids.size == 0:
      raise ValueError(f"{self.path}: no video has domain {domain}; domains: {self.domains}")
    remap = np.full(len(self.video_domain), -1, np.int64)
    remap[vids] = np.arange(vids.size)
    d_q = _text_width(self)
    if self.question_features is not None:
      q = np.flatnonzero(remap[self.question_video] >= 0)
      questions, qmask = self.question_features[q], self.question_mask[q]
      qvid, answers = remap[self.question_video[q]], self.answers[q]
      qtype = self.question_type[q]
    else:
      questions, qmask = np.zeros((0, 1, d_q), np.float32), np.zeros((0, 1), bool)
      qvid = answers = qtype = np.zeros(0, np.int32)
    if self.caption_features is not None:
      c = np.flatnonzero(remap[self.caption_video] >= 0)
      captions, cmask, cvid = self.caption_features[c], self.caption_mask[c], self.caption_video[c]
      cvid = remap[cvid]
    else:
      captions, cmask = np.zeros((0, 1, d_q), np.float32), np.zeros((0, 1), bool)
      cvid = np.zeros(0, np.int32)
    return DomainData(
      frames=self.frame_features[vids],
      frame_mask=self.frame_mask[vids],
      questions=questions,
      question_mask=qmask,
      question_video=np.asarray(qvid, np.int32),
      answers=np.asarray(answers, np.int32),
      question_type=np.asarray(qtype, np.int32),
      captions=captions,
      caption_mask=cmask,
      caption_video=np.asarray(cvid, np.int32),
      domain=int(domain),
    )


def _text_width(split: FeatureSplit) -> int:
  for f in (split.question_features, split.caption_features):
    if f is not None:
      return int(f.shape[-1])
  return 0


def load_feature_split(path: str | os.PathLike) -> FeatureSplit:
  """Reads one split of a real benchmark from pre-extracted features.

  The user extracts features once with any frozen backbone (e.g. CLIP ViT-B/32 frame features and
  its text encoder's token features for MSRVTT-QA / MSVD-QA / MSR-VTT retrieval) and writes one
  ``.npz`` per split (``train.npz``, ``test.npz``) with these arrays (``np.savez``, no pickles):

  ==================== ======================= ==================================================
  key                  dtype, shape            meaning
  ==================== ======================= ==================================================
  frame_features       float16/32 [V, T, D_v]  per-frame features, zero-padded to T frames
  frame_mask           bool [V, T] (optional)  real frames (default: all True); >= 1 per video
  video_domain         int [V]                 the simulated device of each video, e.g. the
                                               MSR-VTT category (0..19) or a user-like cluster
  question_features    float [N_q, L, D_q]     token features of each question (QA benchmarks)
  question_mask        bool [N_q, L] (opt.)    real tokens (default: all True); >= 1 per row
  question_video       int [N_q]               index of the video (0..V-1) a question is about
  answers              int [N_q]               answer id into ``answer_vocab``
  answer_vocab         str [A] (optional)      answer strings (default: "0".."A-1")
  question_type        int [N_q] (optional)    e.g. what/who/how/when/where (default: -1)
  caption_features     float [N_c, L_c, D_q]   token features of captions (retrieval)
  caption_mask         bool [N_c, L_c] (opt.)  real tokens (default: all True)
  caption_video        int [N_c]               the video a caption describes
  ==================== ======================= ==================================================

  A file needs the question keys (MSRVTT-QA, MSVD-QA), the caption keys (MSR-VTT retrieval) or
  both; question and caption features share the width D_q.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: naming the key and the file when an array is missing, has the wrong rank, a
      mismatched length, or an index out of range.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"features file {path} does not exist (see cdc.data docstring)")
  with np.load(path, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  for key in _REQUIRED:
    _need(arrays, path, key, 3 if key == "frame_features" else 1)
  frames, frame_mask, domain = _read_videos(arrays, path)
  has_qa = any(k in arrays for k in _QA_KEYS)
  has_ret = any(k in arrays for k in _RET_KEYS)
  if not (has_qa or has_ret):
    raise ValueError(f"{path}: neither question keys {_QA_KEYS} nor caption keys {_RET_KEYS}")
  q = c = (None, None, None)
  answers = qtype = None
  vocab: tuple[str, ...] = ()
  if has_qa:
    q = _read_text(arrays, path, "question", "question_video", len(frames))
    answers, qtype, vocab = _read_answers(arrays, path, q[2])
  if has_ret:
    c = _read_text(arrays, path, "caption", "caption_video", len(frames))
  if has_qa and has_ret and q[0].shape[-1] != c[0].shape[-1]:
    raise ValueError(
      f"{path}: question_features width {q[0].shape[-1]} != caption_features width {c[0].shape[-1]}"
    )
  return FeatureSplit(
    frame_features=frames,
    frame_mask=frame_mask,
    video_domain=domain,
    question_features=q[0],
    question_mask=q[1],
    question_video=q[2],
    answers=answers,
    question_type=qtype,
    caption_features=c[0],
    caption_mask=c[1],
    caption_video=c[2],
    answer_vocab=vocab,
    path=path,
  )


def _need(arrays: dict[str, np.ndarray], path: str, key: str, rank: int) -> np.ndarray:
  """``arrays[key]``, refused when missing or not of ``rank``."""
  if key not in arrays:
    raise ValueError(f"{path}: missing array {key!r}")
  a = arrays[key]
  if a.ndim != rank:
    raise ValueError(f"{path}: {key!r} has shape {a.shape}, expected rank {rank}")
  return a


def _read_videos(arrays, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(frame features float32 [V, T, D_v], frame mask bool [V, T], domain int32 [V]), checked."""
  frames = _need(arrays, path, "frame_features", 3).astype(np.float32)
  v, t = frames.shape[:2]
  frame_mask = arrays.get("frame_mask", np.ones((v, t), bool)).astype(bool)
  domain = _need(arrays, path, "video_domain", 1).astype(np.int32)
  if frame_mask.shape != (v, t) or domain.shape != (v,):
    raise ValueError(
      f"{path}: frame_mask {frame_mask.shape} / video_domain {domain.shape} do not match "
      f"frame_features [V={v}, T={t}]"
    )
  if v == 0 or not frame_mask.any(axis=1).all():
    raise ValueError(f"{path}: every video needs at least one frame (frame_mask)")
  return frames, frame_mask, domain


def _read_text(arrays, path: str, prefix: str, video_key: str, num_videos: int):
  """The ``<prefix>_*`` token features of questions or captions, checked against V videos.

  Returns:
    (features float32 [N, L, D_q], mask bool [N, L], the video of each row int32 [N]).
  """
  feats = _need(arrays, path, f"{prefix}_features", 3).astype(np.float32)
  n, length = feats.shape[:2]
  mask = arrays.get(f"{prefix}_mask", np.ones((n, length), bool)).astype(bool)
  video = _need(arrays, path, video_key, 1).astype(np.int32)
  if mask.shape != (n, length) or video.shape != (n,):
    raise ValueError(
      f"{path}: {prefix}_mask {mask.shape} / {video_key} {video.shape} do not match "
      f"{prefix}_features [N={n}, L={length}]"
    )
  if n and (video.min() < 0 or video.max() >= num_videos):
    raise ValueError(f"{path}: {video_key} has an index outside 0..{num_videos - 1}")
  if n and not mask.any(axis=1).all():
    raise ValueError(f"{path}: every row of {prefix}_mask needs at least one token")
  return feats, mask, video


def _read_answers(arrays, path: str, question_video: np.ndarray):
  """(answers int32 [N_q], question type int32 [N_q], answer vocabulary), checked.

  Without ``answer_vocab`` the answers are their own names "0".."A-1"; without ``question_type``
  every type is -1 (unknown).
  """
  answers = _need(arrays, path, "answers", 1).astype(np.int32)
  if answers.shape != question_video.shape:
    raise ValueError(f"{path}: answers {answers.shape} vs question_video {question_video.shape}")
  if "answer_vocab" in arrays:
    vocab = tuple(str(s) for s in arrays["answer_vocab"])
  else:
    vocab = tuple(str(i) for i in range(int(answers.max(initial=-1)) + 1))
  if answers.size and (answers.min() < 0 or answers.max() >= len(vocab)):
    raise ValueError(f"{path}: answers has an id outside 0..{len(vocab) - 1} (answer_vocab)")
  qtype = arrays.get("question_type", np.full(answers.shape, -1)).astype(np.int32)
  return answers, qtype, vocab


class FeatureBenchmark:
  """A real benchmark read from ``<data_dir>/<split>.npz`` files (``load_feature_split``).

  Devices are the domain ids of the ``train`` split; ``num_heldout`` of them, fixed by
  ``split_seed``, never enter meta-training. The source (cloud) domain is the videos of the
  domains listed in ``source_domains`` (their ``train`` split), which are then not devices.
  Per device, ``pool`` = its train-split videos (unlabeled use), ``train`` = the same videos with
  labels, ``test`` = its test-split videos.
  """

  def __init__(self, data_dir: str, *, num_heldout: int, split_seed: int, source_domains=()):
    self.train = load_feature_split(os.path.join(data_dir, "train.npz"))
    self.test = load_feature_split(os.path.join(data_dir, "test.npz"))
    source = set(int(s) for s in source_domains)
    domains = np.array([d for d in self.train.domains if int(d) not in source], np.int32)
    if len(domains) < 2:
      raise ValueError(f"{data_dir}: need >= 2 device domains, found {domains.tolist()}")
    meta, held = split_devices(len(domains), num_heldout, split_seed)
    self.meta_train_devices, self.heldout_devices = domains[meta], domains[held]
    self.source_domains = tuple(sorted(source)) or tuple(int(d) for d in self.meta_train_devices)
    self.answer_vocab = self.train.answer_vocab

  def check_meta_train(self, devices: Sequence[int]) -> np.ndarray:
    """As ``MovingShapes.check_meta_train``."""
    devices = np.asarray(devices, np.int32).reshape(-1)
    leaked = np.intersect1d(devices, self.heldout_devices)
    if leaked.size:
      raise ValueError(f"device {int(leaked[0])} is held out from meta-training")
    return devices

  def domain(self, device: int, split: str) -> DomainData:
    """``pool``/``train``: the device's train-split videos; ``test``: its test-split videos;
    ``device == SOURCE``: the source domains' videos of ``split`` together."""
    table = self.test if split == "test" else self.train
    if device == SOURCE:
      parts = [table.domain(d) for d in self.source_domains if d in table.domains]
      return concat_domains(parts, SOURCE)
    return table.domain(device)
