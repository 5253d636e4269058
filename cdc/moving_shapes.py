"""The synthetic "moving shapes" video QA + retrieval task of CDC-MMPG-style adaptation.

**Moving shapes** (spec section 9.A, rendered by this repo). A video is ``num_frames`` RGB frames of
``resolution`` x ``resolution`` pixels showing 1..``max_objects`` objects, each a shape of
``common.data.shapes`` (circle, square, triangle, cross by default) in one of 6 colours, moving
left, right, up or down at a constant speed, or static. The objects of one video have distinct
shapes and distinct colours, so every question below has one answer. Each object's coverage mask
comes from the foundation's shapes renderer (antialiased by supersampling); the frame is composed
here: a background, the objects in order, then the device's sensor noise and blur.

Each video carries one question from four templates, answered by one token of ``Vocab.answers``:

* count      "how many objects"                        -> one | two | three
* colour     "what colour is the <shape>"              -> a colour
* direction  "which direction does the <shape> move"   -> left | right | up | down | static
* shape      "what shape is the <colour>"              -> a shape

and one caption for text-to-video retrieval, "<colour> <shape> <direction>" per object joined by
"and" (a video's whole content, so captions rarely collide inside a gallery).

**Devices.** Device ``d`` in ``0..num_devices-1`` has its own shift (``DeviceShift``), drawn from
``rng([dataset_seed, d])``: a hue rotation and brightness of the colour palette, its own
background colours and texture (plain, stripes, checker), Gaussian sensor noise and optional blur,
a speed prior, and Dirichlet priors over object counts, colours, directions and question
templates. ``cdc.data.SOURCE`` (-1) is the cloud's canonical rendering: the palette of
``common.data.shapes``, its backgrounds, no noise, uniform priors.

**Determinism.** Video ``i`` of split ``s`` of device ``d`` depends only on ``(dataset_seed, d, s,
i)`` and the rendering options: its content, noise and question come from
``np.random.default_rng([dataset_seed, d + 1, SPLIT_CODES[s], i])``.

Devices ``0..num_devices-1`` are split into meta-training and held-out ones by
``cdc.data.split_devices``; every split of every device is handed out as a ``cdc.data.DomainData``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from cdc.data import SOURCE, DomainData, split_devices
from common.data import shapes

SPLIT_CODES = {"pool": 0, "train": 1, "test": 2}
SOURCE_SPLITS = ("train", "test")

DEFAULT_SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
DIRECTIONS = ("left", "right", "up", "down", "static")
COUNT_WORDS = ("one", "two", "three")
QUESTION_TYPES = ("count", "colour", "direction", "shape")
_VELOCITY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_FUNCTION_WORDS = (
  "<pad>",
  "how",
  "many",
  "objects",
  "what",
  "colour",
  "is",
  "the",
  "which",
  "direction",
  "does",
  "move",
  "shape",
  "and",
)
QUESTION_LEN = 6
_MARGIN = 0.02
# A coverage mask is the renderer's white shape on its black background: (v - black) / span.
_WHITE = list(shapes.COLOURS).index("white")
_BLACK = list(shapes.BACKGROUNDS).index("black")
_LO = float(shapes.BACKGROUNDS["black"][0][0])
_HI = float(shapes.COLOURS["white"][0])


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Token and answer vocabularies of a moving-shapes dataset with the given shape names."""

  shape_names: tuple[str, ...]

  @functools.cached_property
  def tokens(self) -> tuple[str, ...]:
    return _FUNCTION_WORDS + self.shape_names + COLOURS + DIRECTIONS

  @functools.cached_property
  def token_id(self) -> dict[str, int]:
    return {w: i for i, w in enumerate(self.tokens)}

  @functools.cached_property
  def answers(self) -> tuple[str, ...]:
    return COLOURS + self.shape_names + DIRECTIONS + COUNT_WORDS

  @functools.cached_property
  def answer_id(self) -> dict[str, int]:
    return {w: i for i, w in enumerate(self.answers)}

  @property
  def caption_len(self) -> int:
    return 3 * 3 + 2  # three objects of 3 tokens and two "and"

  def encode(self, words: Sequence[str], length: int) -> np.ndarray:
    """Token ids int32 [length], zero-padded (0 = ``<pad>``)."""
    if len(words) > length:
      raise ValueError(f"{' '.join(words)!r} has {len(words)} tokens > length {length}")
    out = np.zeros(length, np.int32)
    out[: len(words)] = [self.token_id[w] for w in words]
    return out


@dataclasses.dataclass(frozen=True)
class DeviceShift:
  """How one device's videos differ from the cloud's.

  Attributes:
    device: the device id (``SOURCE`` = -1 for the canonical domain).
    hue_deg: rotation of the object palette about the grey axis, degrees.
    brightness: multiplier of the object colours.
    backgrounds: float32 [n, 2, 3] colour pairs (a gradient from the first to the second).
    texture: "plain" | "stripes" | "checker".
    texture_amp: texture amplitude in 0..255 units.
    texture_period: texture period in pixels.
    noise_std: Gaussian sensor noise std in 0..255 units.
    blur: whether frames pass through a 3x3 box blur.
    speed: mean speed, fraction of the side per frame.
    count_prior, colour_prior, direction_prior, question_mix: probability vectors.
  """

  device: int
  hue_deg: float
  brightness: float
  backgrounds: np.ndarray
  texture: str
  texture_amp: float
  texture_period: float
  noise_std: float
  blur: bool
  speed: float
  count_prior: np.ndarray
  colour_prior: np.ndarray
  direction_prior: np.ndarray
  question_mix: np.ndarray

  @functools.cached_property
  def palette(self) -> np.ndarray:
    """float32 [6, 3]: the RGB (0..255) of each of ``COLOURS`` as this device renders it."""
    base = np.array([shapes.COLOURS[c] for c in COLOURS], np.float64)
    return np.clip(base @ _hue_matrix(self.hue_deg).T * self.brightness, 0, 255).astype(np.float32)


def _hue_matrix(deg: float) -> np.ndarray:
  """Rotation of RGB about the grey axis (1, 1, 1) by ``deg`` degrees (a hue shift)."""
  a = math.radians(deg)
  c, s, k = math.cos(a), math.sin(a), 1.0 / 3.0
  r = math.sqrt(k) * s
  return np.array(
    [
      [c + (1 - c) * k, (1 - c) * k - r, (1 - c) * k + r],
      [(1 - c) * k + r, c + (1 - c) * k, (1 - c) * k - r],
      [(1 - c) * k - r, (1 - c) * k + r, c + (1 - c) * k],
    ]
  )


def device_shift(dataset_seed: int, device: int, max_objects: int, shift_scale: float = 1.0):
  """The shift of ``device`` (``SOURCE`` for the canonical domain), a function of the arguments.

  ``shift_scale`` multiplies the hue range (35 degrees), brightness range, noise (up to 30 of 255),
  texture amplitude and the concentration of the priors' departure from uniform; 0 makes every
  device render like the source except for its background colours.
  """
  uniform = lambda n: np.full(n, 1.0 / n)
  if device == SOURCE:
    return DeviceShift(
      device=SOURCE,
      hue_deg=0.0,
      brightness=1.0,
      backgrounds=np.array(list(shapes.BACKGROUNDS.values()), np.float32),
      texture="plain",
      texture_amp=0.0,
      texture_period=4.0,
      noise_std=0.0,
      blur=False,
      speed=0.035,
      count_prior=uniform(max_objects),
      colour_prior=uniform(len(COLOURS)),
      direction_prior=uniform(len(DIRECTIONS)),
      question_mix=uniform(len(QUESTION_TYPES)),
    )
  if device < 0:
    raise ValueError(f"device id {device} < 0 (and not SOURCE={SOURCE})")
  rng = np.random.default_rng([dataset_seed, device])
  s = float(shift_scale)

  def prior(n):
    # A Dirichlet draw mixed with uniform: shift_scale 0 is uniform, 1 a draw from Dir(1).
    return (1.0 - min(s, 1.0)) * uniform(n) + min(s, 1.0) * rng.dirichlet(np.ones(n))

  backgrounds = rng.uniform(0.0, 90.0, size=(2, 2, 3)).astype(np.float32)
  return DeviceShift(
    device=int(device),
    hue_deg=float(rng.uniform(-35.0, 35.0) * s),
    brightness=float(1.0 + rng.uniform(-0.25, 0.1) * s),
    backgrounds=backgrounds,
    texture=str(rng.choice(["plain", "stripes", "checker"])),
    texture_amp=float(rng.uniform(5.0, 25.0) * s),
    texture_period=float(rng.choice([2.0, 3.0, 4.0])),
    noise_std=float(rng.uniform(0.0, 30.0) * s),
    blur=bool(rng.random() < 0.3 * min(s, 1.0)),
    speed=float(np.clip(0.035 + rng.uniform(-0.02, 0.025) * s, 0.008, 0.08)),
    count_prior=prior(max_objects),
    colour_prior=prior(len(COLOURS)),
    direction_prior=prior(len(DIRECTIONS)),
    question_mix=prior(len(QUESTION_TYPES)),
  )


class MovingShapes:
  """The synthetic moving-shapes task of one ``data`` config (see the module docstring).

  Args:
    num_devices: simulated devices (the spec asks for 20-50).
    num_heldout: devices never seen in meta-training.
    split_seed: fixes the held-out devices.
    dataset_seed: fixes every device's shift and every video.
    num_frames, resolution: video size.
    max_objects: 1..3 objects per video.
    object_radius: half-extent of a shape, fraction of the side.
    shape_names: shapes of ``common.data.shapes.SHAPES`` to use.
    shift_scale: severity of the device shifts (``device_shift``).
    pool_videos, train_videos, test_videos: videos per device split (``pool`` is the device's
      unlabeled stream); ``source_train_videos``, ``source_test_videos`` for the source.
  """

  def __init__(
    self,
    *,
    num_devices: int = 40,
    num_heldout: int = 10,
    split_seed: int = 0,
    dataset_seed: int = 0,
    num_frames: int = 8,
    resolution: int = 16,
    max_objects: int = 3,
    object_radius: float = 0.18,
    shape_names: Sequence[str] = DEFAULT_SHAPES,
    shift_scale: float = 1.0,
    pool_videos: int = 64,
    train_videos: int = 256,
    test_videos: int = 128,
    source_train_videos: int = 8000,
    source_test_videos: int = 1000,
  ):
    shapes.check_resolution(resolution)
    unknown = [s for s in shape_names if s not in shapes.SHAPES]
    if unknown or len(set(shape_names)) != len(shape_names) or len(shape_names) < 3:
      raise ValueError(
        f"data.shape_names={tuple(shape_names)}: need >= 3 distinct names from {shapes.SHAPES}"
      )
    if not 1 <= max_objects <= len(COUNT_WORDS):
      raise ValueError(f"data.max_objects={max_objects} must be in 1..{len(COUNT_WORDS)}")
    if num_frames < 2:
      raise ValueError(f"data.num_frames={num_frames}: motion needs at least 2 frames")
    if not 0.05 <= object_radius <= 0.3:
      raise ValueError(f"data.object_radius={object_radius} must be in [0.05, 0.3]")
    self.meta_train_devices, self.heldout_devices = split_devices(
      num_devices, num_heldout, split_seed
    )
    self.num_devices = num_devices
    self.dataset_seed = dataset_seed
    self.num_frames = num_frames
    self.resolution = resolution
    self.max_objects = max_objects
    self.object_radius = object_radius
    self.shape_names = tuple(shape_names)
    self.shape_ids = tuple(shapes.SHAPES.index(s) for s in shape_names)
    self.shift_scale = shift_scale
    self.vocab = Vocab(self.shape_names)
    self.split_sizes = {"pool": pool_videos, "train": train_videos, "test": test_videos}
    self.source_sizes = {"train": source_train_videos, "test": source_test_videos}

  @classmethod
  def from_config(cls, data) -> MovingShapes:
    """From a ``data`` ConfigDict of ``configs/cdc.py``."""
    return cls(
      num_devices=data.num_devices,
      num_heldout=data.num_heldout,
      split_seed=data.split_seed,
      dataset_seed=data.dataset_seed,
      num_frames=data.num_frames,
      resolution=data.resolution,
      max_objects=data.max_objects,
      object_radius=data.object_radius,
      shape_names=tuple(data.shape_names),
      shift_scale=data.shift_scale,
      pool_videos=data.pool_videos,
      train_videos=data.train_videos,
      test_videos=data.test_videos,
      source_train_videos=data.source_train_videos,
      source_test_videos=data.source_test_videos,
    )

  # ---------------------------------------------------------------------------------------------
  # Devices.

  def shift(self, device: int) -> DeviceShift:
    """The shift of ``device`` (or ``SOURCE``)."""
    if device != SOURCE and not 0 <= device < self.num_devices:
      raise ValueError(f"device {device} is not in 0..{self.num_devices - 1} (or SOURCE)")
    return device_shift(self.dataset_seed, device, self.max_objects, self.shift_scale)

  def check_meta_train(self, devices: Sequence[int]) -> np.ndarray:
    """Returns ``devices`` as int32 after checking none is held out (or the source).

    Raises:
      ValueError: naming the first held-out device among ``devices``.
    """
    devices = np.asarray(devices, np.int32).reshape(-1)
    leaked = np.intersect1d(devices, self.heldout_devices)
    if leaked.size:
      raise ValueError(
        f"device {int(leaked[0])} is held out from meta-training "
        f"(held-out: {self.heldout_devices.tolist()})"
      )
    bad = devices[(devices < 0) | (devices >= self.num_devices)]
    if bad.size:
      raise ValueError(f"device {int(bad[0])} is not a device id in 0..{self.num_devices - 1}")
    return devices

  # ---------------------------------------------------------------------------------------------
  # Videos.

  def _sample_video(self, shift: DeviceShift, rng: np.random.Generator) -> dict:
    t_count, r = self.num_frames, self.object_radius
    n_obj = 1 + int(rng.choice(self.max_objects, p=shift.count_prior))
    shape_idx = rng.choice(len(self.shape_names), n_obj, replace=False)
    colour_idx = rng.choice(len(COLOURS), n_obj, replace=False, p=shift.colour_prior)
    direction_idx = rng.choice(len(DIRECTIONS), n_obj, p=shift.direction_prior)
    lo, hi = r + _MARGIN, 1.0 - r - _MARGIN
    objects = []
    for j in range(n_obj):
      direction = DIRECTIONS[direction_idx[j]]
      speed = 0.0 if direction == "static" else shift.speed * float(rng.uniform(0.7, 1.3))
      # The whole path stays inside the frame: a faster object starts nearer the far edge.
      travel = min(speed * (t_count - 1), 0.9 * (hi - lo))
      vx, vy = _VELOCITY.get(direction, (0.0, 0.0))
      best = None
      for _ in range(12):  # rejection sampling keeps start positions apart where possible
        x0 = rng.uniform(lo + max(-vx, 0) * travel, hi - max(vx, 0) * travel)
        y0 = rng.uniform(lo + max(-vy, 0) * travel, hi - max(vy, 0) * travel)
        gap = min([math.hypot(x0 - o["x0"], y0 - o["y0"]) for o in objects] + [9.0])
        if best is None or gap > best[0]:
          best = (gap, x0, y0)
        if gap >= 2.2 * r:
          break
      objects.append(
        dict(
          shape=int(shape_idx[j]),
          colour=int(colour_idx[j]),
          direction=int(direction_idx[j]),
          x0=best[1],
          y0=best[2],
          dx=vx * travel / (t_count - 1),
          dy=vy * travel / (t_count - 1),
        )
      )
    background = int(rng.integers(len(shift.backgrounds)))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    qtype = int(rng.choice(len(QUESTION_TYPES), p=shift.question_mix))
    target = int(rng.integers(n_obj))
    noise_seed = int(rng.integers(2**31))
    return dict(
      objects=objects,
      background=background,
      angle=angle,
      qtype=qtype,
      target=target,
      noise_seed=noise_seed,
    )

  def _question(self, video: dict) -> tuple[list[str], str]:
    obj = video["objects"][video["target"]]
    shape = self.shape_names[obj["shape"]]
    colour = COLOURS[obj["colour"]]
    qtype = QUESTION_TYPES[video["qtype"]]
    if qtype == "count":
      return ["how", "many", "objects"], COUNT_WORDS[len(video["objects"]) - 1]
    if qtype == "colour":
      return ["what", "colour", "is", "the", shape], colour
    if qtype == "direction":
      return ["which", "direction", "does", "the", shape, "move"], DIRECTIONS[obj["direction"]]
    return ["what", "shape", "is", "the", colour], shape

  def _caption(self, video: dict) -> list[str]:
    words = []
    for j, o in enumerate(video["objects"]):
      if j:
        words.append("and")
      words += [COLOURS[o["colour"]], self.shape_names[o["shape"]], DIRECTIONS[o["direction"]]]
    return words

  def _background(self, shift: DeviceShift, video: dict) -> np.ndarray:
    res = self.resolution
    c = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    cos, sin = math.cos(video["angle"]), math.sin(video["angle"])
    t = np.clip(0.5 + c[None, :] * cos + c[:, None] * sin, 0.0, 1.0)[..., None]
    c0, c1 = shift.backgrounds[video["background"]]
    bg = c0 + (c1 - c0) * t
    if shift.texture != "plain":
      px = np.arange(res, dtype=np.float32)
      if shift.texture == "stripes":
        period = shift.texture_period
        pattern = np.sign(np.sin(2 * math.pi * (px[None, :] * cos + px[:, None] * sin) / period))
      else:
        p = shift.texture_period
        pattern = 1.0 - 2.0 * ((np.floor(px[None, :] / p) + np.floor(px[:, None] / p)) % 2)
      bg = bg + shift.texture_amp * pattern[..., None]
    return bg.astype(np.float32)

  def render(self, shift: DeviceShift, videos: list[dict]) -> np.ndarray:
    """Renders sampled videos to uint8 [len(videos), T, res, res, 3]."""
    t_count, res = self.num_frames, self.resolution
    params = []
    for v in videos:
      for o in v["objects"]:
        for t in range(t_count):
          params.append(
            dict(
              shape=self.shape_ids[o["shape"]],
              colour=_WHITE,
              background=_BLACK,
              cx=o["x0"] + t * o["dx"],
              cy=o["y0"] + t * o["dy"],
              radius=self.object_radius,
              cos=1.0,
              sin=0.0,
            )
          )
    # One renderer call for every object of every frame: the white-on-black coverage masks.
    masks = shapes.render(params, res)[..., 0].astype(np.float32) if params else None
    out = np.empty((len(videos), t_count, res, res, 3), np.uint8)
    palette = shift.palette
    k = 0
    for i, v in enumerate(videos):
      frames = np.broadcast_to(self._background(shift, v), (t_count, res, res, 3)).copy()
      for o in v["objects"]:
        alpha = np.clip((masks[k : k + t_count] - _LO) / (_HI - _LO), 0.0, 1.0)[..., None]
        frames += (palette[o["colour"]] - frames) * alpha
        k += t_count
      if shift.noise_std > 0:
        noise_rng = np.random.default_rng(v["noise_seed"])
        frames += shift.noise_std * noise_rng.standard_normal(frames.shape, dtype=np.float32)
      if shift.blur:
        padded = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        frames = sum(
          padded[:, a : a + res, b : b + res] for a in range(3) for b in range(3)
        ) / np.float32(9.0)
      out[i] = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    return out

  def sample_videos(self, device: int, split: str, indices: Sequence[int]) -> list[dict]:
    """The sampled content (objects, background, question draw) of videos ``indices``."""
    self._check_split(device, split)
    shift = self.shift(device)
    code = SPLIT_CODES[split]
    return [
      self._sample_video(
        shift, np.random.default_rng([self.dataset_seed, device + 1, code, int(i)])
      )
      for i in indices
    ]

  def _check_split(self, device: int, split: str) -> None:
    allowed = SOURCE_SPLITS if device == SOURCE else tuple(SPLIT_CODES)
    if split not in allowed:
      raise ValueError(f"split {split!r} of device {device}: allowed {allowed}")

  def domain(self, device: int, split: str, num_videos: int | None = None) -> DomainData:
    """The first ``num_videos`` (default: the split's size) videos of ``device``'s ``split``.

    Returns a ``DomainData`` with pixel frames float32 [V, T, res, res, 3] in [-1, 1], one
    question and one caption per video (``question_video = caption_video = arange(V)``).
    """
    self._check_split(device, split)
    sizes = self.source_sizes if device == SOURCE else self.split_sizes
    n = sizes[split] if num_videos is None else int(num_videos)
    videos = self.sample_videos(device, split, range(n))
    frames = shapes.to_float(self.render(self.shift(device), videos))
    qs, answers, captions = [], [], []
    for v in videos:
      words, answer = self._question(v)
      qs.append(self.vocab.encode(words, QUESTION_LEN))
      answers.append(self.vocab.answer_id[answer])
      captions.append(self.vocab.encode(self._caption(v), self.vocab.caption_len))
    qs = np.stack(qs) if n else np.zeros((0, QUESTION_LEN), np.int32)
    captions = np.stack(captions) if n else np.zeros((0, self.vocab.caption_len), np.int32)
    index = np.arange(n, dtype=np.int32)
    return DomainData(
      frames=frames,
      frame_mask=np.ones(frames.shape[:2], bool),
      questions=qs,
      question_mask=qs > 0,
      question_video=index,
      answers=np.asarray(answers, np.int32),
      question_type=np.asarray([v["qtype"] for v in videos], np.int32),
      captions=captions,
      caption_mask=captions > 0,
      caption_video=index.copy(),
      domain=int(device),
    )

  def drift_stream(
    self, first: int, second: int, num_windows: int, switch_at: int, videos_per_window: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """A device whose shift changes mid-stream: ``first``'s pool videos, then ``second``'s.

    Returns:
      frames: float32 [num_windows, videos_per_window, T, res, res, 3], window ``w`` from device
        ``first`` if ``w < switch_at`` else ``second`` (consecutive pool videos, no repeats).
      source: int32 [num_windows], the device of each window.
    """
    if not 0 < switch_at < num_windows:
      raise ValueError(f"switch_at={switch_at} must be in (0, num_windows={num_windows})")
    windows, source = [], []
    for w in range(num_windows):
      device, start = (first, w) if w < switch_at else (second, w - switch_at)
      idx = range(start * videos_per_window, (start + 1) * videos_per_window)
      videos = self.sample_videos(device, "pool", idx)
      windows.append(shapes.to_float(self.render(self.shift(device), videos)))
      source.append(device)
    return np.stack(windows), np.asarray(source, np.int32)
